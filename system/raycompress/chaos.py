"""Failure injection for the fault tests and `jobs/benchmarks/chaos.py`: a worker that reaches a
named point dies at once (`os._exit`, as a SIGKILL would leave it), once per marker file.

Nothing here runs unless its environment variable is set. The variables travel to actors through
`env_vars()` in their runtime env, so a test sets them in the driver's environment only:

- RAYCOMPRESS_CHAOS_KILL_LAYER=N, RAYCOMPRESS_CHAOS_KILL_PHASE=begin|stats|solve|write: the first
  compression actor to reach that phase of decoder layer N dies (`write`: after its shard is
  durable, before the driver records the layer as done).
- RAYCOMPRESS_CHAOS_KILL_EVAL_UNIT=N: the first eval actor to start unit N dies.
- RAYCOMPRESS_CHAOS_MARKER=PATH: created with O_EXCL by the dying process, so a fault happens once
  per run (a replacement actor finds it and goes on).
- RAYCOMPRESS_CHAOS_SLOW_LAYER_S=S: every decoder layer starts S seconds late (time for a test to
  stop or kill a job mid-compress).
"""
from __future__ import annotations

import os
import time

KILL_LAYER = "RAYCOMPRESS_CHAOS_KILL_LAYER"
KILL_PHASE = "RAYCOMPRESS_CHAOS_KILL_PHASE"
KILL_EVAL_UNIT = "RAYCOMPRESS_CHAOS_KILL_EVAL_UNIT"
MARKER = "RAYCOMPRESS_CHAOS_MARKER"
SLOW_LAYER_S = "RAYCOMPRESS_CHAOS_SLOW_LAYER_S"
PHASES = ("begin", "stats", "solve", "write")
VARIABLES = (KILL_LAYER, KILL_PHASE, KILL_EVAL_UNIT, MARKER, SLOW_LAYER_S)


def env_vars() -> dict[str, str]:
    """The chaos variables set in this process: what an actor's runtime env must carry."""
    return {k: os.environ[k] for k in VARIABLES if k in os.environ}


def die_once() -> None:
    """Exit this process at once (as SIGKILL would) unless the marker file exists; create it first."""
    marker = os.environ.get(MARKER)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def layer_point(layer_idx: int, phase: str) -> None:
    """Called by a compression actor at `phase` of decoder layer `layer_idx`."""
    if phase == "begin" and os.environ.get(SLOW_LAYER_S):
        time.sleep(float(os.environ[SLOW_LAYER_S]))
    target = os.environ.get(KILL_LAYER)
    if target and int(target) == int(layer_idx) and os.environ.get(KILL_PHASE, "begin") == phase:
        die_once()


def eval_point(unit: int) -> None:
    """Called by an eval actor as it starts unit `unit`."""
    target = os.environ.get(KILL_EVAL_UNIT)
    if target and int(target) == int(unit):
        die_once()

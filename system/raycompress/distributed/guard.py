"""What keeps an output folder consistent across runs: one holder at a time, and no stage reused
by a job it does not belong to.

`OutputLock`: `<out>/.lock` (JSON: host, pid, start, heartbeat) taken before any stage runs and
refreshed every `HEARTBEAT_S` by a thread; a second run on the same folder refuses, naming the
holder. A lock is stale when its holder is a dead process on this host, or when its heartbeat is
older than `STALE_S` (a driver killed on another node), so a killed run's rerun resumes.
On object storage there is no create-if-absent: the lock is written, then read back after a short
wait, and the run that reads another token backs off.

`stage_inputs` / `check_stages`: each finished stage records in `state.json` what determined it
(the model's content fingerprint and the config sections it reads). A rerun whose job differs
refuses to reuse that stage, naming every field that differs, unless `--force-stage` redoes it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from raycompress.config import JobConfig
from raycompress.storage import uri

HEARTBEAT_S = 20.0
STALE_S = 90.0


class OutputBusy(RuntimeError):
    """Another live run holds the output folder."""


class StageMismatch(ValueError):
    """A finished stage in the output folder was made by a different job."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Context manager holding `<out>/.lock` (see module docstring).

    Raises (on enter):
        OutputBusy: a live run holds it; the message names its host, pid and start time.
    """

    def __init__(self, out_dir: str, settle_s: float = 0.5) -> None:
        self.out_dir, self.path = out_dir, uri.join(out_dir, ".lock")
        self.token = uuid.uuid4().hex
        self.settle_s = settle_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self._started, "heartbeat": time.time()}

    def _holder(self) -> dict | None:
        """The current holder if it is live, else None."""
        try:
            held = json.loads(uri.read_text(self.path))
        except (FileNotFoundError, ValueError):
            return None
        if held.get("token") == self.token:
            return None
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
            return None
        return held if time.time() - float(held.get("heartbeat", 0)) < STALE_S else None

    def __enter__(self) -> "OutputLock":
        self._started = time.time()
        for _ in range(2):  # write, settle, read back: the later writer of a race backs off
            held = self._holder()
            if held:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
                raise OutputBusy(f"{uri.display(self.out_dir)} is in use by another run (host "
                                 f"{held.get('host')}, pid {held.get('pid')}, started {when}); wait for it, "
                                 f"stop it, or use another --output (a dead run's lock expires after {STALE_S:.0f} s)")
            uri.write_text(self.path, json.dumps(self._record()))
            time.sleep(self.settle_s)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            uri.write_text(self.path, json.dumps(self._record()))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            if json.loads(uri.read_text(self.path)).get("token") == self.token:
                uri.delete(self.path)
        except (FileNotFoundError, ValueError):
            pass


def stage_inputs(job: JobConfig, model_fingerprint: str) -> dict[str, dict]:
    """Per stage, what determines its output (each stage also depends on the ones before it)."""
    select = {"model": model_fingerprint, "select": job.select.model_dump(mode="json")}
    compress = {**select, "compress": job.compress.model_dump(mode="json")}
    ev = job.evaluate.model_dump(mode="json", include={"tasks", "include_dense", "dtype"})
    if job.train is None:
        return {"select": select, "compress": compress, "evaluate": {**compress, "evaluate": ev}}
    train = {**compress, "train": job.train.model_dump(mode="json")}
    return {"select": select, "compress": compress, "train": train, "evaluate": {**train, "evaluate": ev}}


def _leaves(d, prefix: str = "") -> dict[str, object]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
    return out


def differences(recorded: dict, current: dict) -> list[str]:
    """'field: recorded -> current' for every leaf that differs."""
    a, b = _leaves(recorded), _leaves(current)
    return [f"{k}: {a.get(k, '(unset)')!r} in the folder, {b.get(k, '(unset)')!r} in this job"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_stages(stages: dict[str, dict], inputs: dict[str, dict], out_dir: str, force: set[str]) -> None:
    """Refuse to reuse a finished stage whose recorded inputs differ from this job's.

    Raises:
        StageMismatch: naming the stage, every differing field, and the way on.
    """
    for name, want in inputs.items():
        rec = stages.get(name)
        if rec is None or name in force:
            continue
        diff = differences(rec.get("inputs", {}), want) if "inputs" in rec else ["(the folder records no inputs)"]
        if diff:
            raise StageMismatch(f"stage {name} in {uri.display(out_dir)} was made by a different job:\n  "
                                + "\n  ".join(diff[:12])
                                + f"\nuse another --output, or --force-stage {name} to redo it and the stages after it")

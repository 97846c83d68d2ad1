"""Chaos benchmark: faults injected into real runs of the smoke job, and hostile inputs; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/chaos.py [--workdir DIR] [--skip-hostile] [--skip-faults] [--skip-leaks] [--smoke]

Every run is the `raycompress` command a user types, as a subprocess on a local Ray (2 CPUs), on
`jobs/smoke.yaml`'s job (a random bf16 Llama of 4 decoder layers, the shipped corpora and tasks):

1. The reference: `raycompress run` undisturbed, its process tree's listening sockets sampled.
2. Faults (`_faults.py`), each on a copy of the reference's finished earlier stages, each compared
   with the reference (checkpoint SHA-256 manifest, calibration fingerprint, or metrics):
   a compression actor SIGKILLed at the start, in statistics, in a solve and right after writing
   a layer; the driver SIGKILLed mid-compress, then the same command again (and the Ray
   processes the dead driver leaves behind, counted 30 s later); an eval actor killed mid-task; a
   selection read task killed mid-stream; the output disk full (a size-limited tmpfs: root only),
   then grown and the command run again; a 75 MiB object store; a second run on a busy folder;
   a rerun whose recipe differs from the folder's.
3. Hostile inputs (`_hostile.py`): bad job files, task files that try to run code or read files
   outside their folder, hostile checkpoints (truncated, lying header, missing shard, NaN weights,
   a pickle that runs code, `auto_map` remote code, an unsupported architecture) and a corpus
   folder of broken files. Each must end in a clean refusal (exit 1 or 2, an `error:` line, no
   traceback) or, for corpus files, a counted skip in the selection manifest with the run finished.
   Also template bombs and Jinja errors in item 1 and beyond (refused before Ray, naming the task),
   and absurd sizes (`ray.compress_actors: 1000000`, `n_samples: 1000000000`, `seq_len: 10**12`).
4. Leaks (`_leaks.py`): inputs edited after a finished run (the model's weights in place, a task's
   template, a task's data, a corpus file truncated), each rerun on a copy of the reference: the
   stage must be refused naming what changed, or redone, never skipped; output folders that are not
   ours (an unrelated non-empty folder, one with a foreign state.json and .lock, `/`, the home
   folder): nothing there may be written or changed.
Every command runs with a time limit (a hostile input: 3x the reference run, at least 240 s); one
that hits it is killed with its process group and counted in `hangs`.

JSON keys: faults_injected, runs_finished, runs_identical (output equal to the undisturbed run's),
bad_inputs_tried, bad_inputs_rejected_cleanly, bad_inputs_rejected_before_ray (refused before a
Ray instance started), code_execution_markers (marker files hostile inputs tried to create and
did: must be 0), files_lost_or_corrupted (files of finished runs missing or differing from their
manifest: must be 0), leftover_ray_processes (after the killed driver), hangs (commands killed at their time limit),
stale_reuses (a rerun that skipped a stage whose inputs had changed), foreign_files_touched (files
of folders not ours that were written, changed or deleted), ports_on_non_loopback (sockets the
reference run's processes listened on outside 127.0.0.0/8 and ::1), all of which must be 0; and
per-case `faults`, `bad_inputs` and `leaks` lists with seconds and the first error line.
The work folder is --workdir (emptied first), else a new temporary folder.
--smoke: the reference run on 4 x 32 calibration tokens and one capped task, then one bad config,
one absurd size, one stale input and one foreign folder (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "raycompress"]
from _common import write_job  # noqa: E402  (the helpers import it from here)


def run_cli(args: list[str], env: dict | None = None, timeout: float = 900, on_start=None) -> dict:
    """Run `raycompress ARGS` from the repository root in its own process group: {rc, seconds, out
    (stdout + stderr), hung}. A command still running after `timeout` seconds is killed with its
    whole group and reported with rc None and hung True. `on_start(pid)`, if given, is called once
    the process exists and returns a callable called (no arguments) when it has ended."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    done = on_start(proc.pid) if on_start else None
    try:
        out, hung = proc.communicate(timeout=timeout)[0], False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command's own group only, by its id
        out, hung = proc.communicate()[0], True
    if done:
        done()
    return {"rc": None if hung else proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "out": out,
            "hung": hung}


def clean_refusal(res: dict) -> bool:
    """Exit 1 or 2 with an `error:` line and no Python traceback."""
    return res["rc"] in (1, 2) and "\nerror: " in "\n" + res["out"] and "Traceback (most recent call last)" not in res["out"]


def first_error(out: str) -> str:
    """The first `error:` line of a command's output, else its last line."""
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")] or out.strip().splitlines()[-1:] or [""]
    return lines[0][:300]


def base_job(workdir: Path, smoke: bool = False) -> dict:
    """jobs/smoke.yaml (`--smoke`: its smallest form) reading only copies under `workdir` that the
    leak cases may edit: the random model built once into a plain folder, the corpora, and the
    shipped task files with their data."""
    from _common import absolute_paths, job_mapping, smoke_job
    from _leaks import private_inputs

    job = absolute_paths(smoke_job() if smoke else job_mapping(REPO / "jobs" / "smoke.yaml"))
    job["storage"] = {"cache_dir": str(workdir / "cache")}
    return private_inputs(workdir, job)


def check_manifest(folder: Path) -> int:
    """Files of a finished checkpoint missing or differing from its manifest.sha256.json."""
    import hashlib

    manifest = json.loads((folder / "manifest.sha256.json").read_text())["files"]
    bad = 0
    for name, meta in manifest.items():
        f = folder / name
        digest = meta["sha256"] if isinstance(meta, dict) else meta
        bad += (not f.is_file()) or hashlib.sha256(f.read_bytes()).hexdigest() != digest
    return bad


def hostile_result(res: dict) -> dict:
    """The common fields of one hostile input's outcome."""
    return {"clean": clean_refusal(res), "rc": res["rc"], "seconds": res["seconds"], "hung": res["hung"],
            "before_ray": "Started a local Ray instance" not in res["out"], "error": first_error(res["out"])}


def summary(faults: list[dict], hostile: list[dict], leaks: dict, finished: list[Path], markers: list[str]) -> dict:
    """The JSON's counts over every case (see the module docstring)."""
    cases = faults + hostile + leaks["cases"]
    return {
        "faults_injected": len(faults),
        "runs_finished": sum(f["finished"] for f in faults),
        "runs_identical": sum(f["identical"] for f in faults),
        "bad_inputs_tried": len(hostile),
        "bad_inputs_rejected_cleanly": sum(h["clean"] for h in hostile),
        "bad_inputs_rejected_before_ray": sum(h.get("before_ray", False) for h in hostile),
        "code_execution_markers": len(markers),
        "code_execution_marker_files": markers,
        "files_lost_or_corrupted": sum(check_manifest(f) for f in finished if (f / "manifest.sha256.json").is_file())
        + sum(not (f / "manifest.sha256.json").is_file() for f in finished),
        "leftover_ray_processes": next((f["leftover_ray_processes"] for f in faults if "leftover_ray_processes" in f), None),
        "hangs": sum(bool(c.get("hung")) for c in cases) + leaks["reference_hung"],
        "stale_reuses": sum(bool(c.get("stale_reuse")) for c in leaks["cases"]),
        "foreign_files_touched": sum(c.get("foreign_files_touched", 0) for c in leaks["cases"]),
        "ports_on_non_loopback": len(leaks["ports_on_non_loopback"]),
        "listening": leaks["listening"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="work folder, emptied first (default: a new temporary folder)")
    p.add_argument("--skip-faults", action="store_true")
    p.add_argument("--skip-hostile", action="store_true")
    p.add_argument("--skip-leaks", action="store_true", help="skip edits between runs and foreign output folders")
    p.add_argument("--smoke", action="store_true", help="tiny reference and one case of each new kind (the test suite runs it)")
    args = p.parse_args()
    import _faults
    import _hostile
    import _leaks
    from _common import emit, work_folder

    if args.workdir is not None:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir = work_folder(args.workdir, "chaos").resolve()
    os.environ.setdefault("RAYCOMPRESS_CACHE_DIR", str(args.workdir / "cache"))
    job = base_job(args.workdir, args.smoke)
    job_file = write_job(args.workdir / "job.yaml", job)
    ref = args.workdir / "ref"
    watch = _leaks.ListenWatch()
    res = run_cli(["run", job_file, "--output", ref], on_start=watch.start)
    if res["rc"] != 0:
        emit({"error": "the undisturbed reference run failed", "hung": res["hung"], "tail": res["out"][-3000:]})
        return 1
    result: dict = {"reference_seconds": res["seconds"], "smoke": args.smoke, "workdir": str(args.workdir)}
    _hostile.TIMEOUT_S = max(_hostile.TIMEOUT_S, 3 * res["seconds"])  # slower than 3 undisturbed runs: a hang
    faults = [] if args.skip_faults or args.smoke else _faults.run_all(args.workdir, job, ref)
    hostile = [] if args.skip_hostile else _hostile.run_all(args.workdir, job, ref, smoke=args.smoke)
    leaks = {"cases": [] if args.skip_leaks else _leaks.run_all(args.workdir, job, ref, smoke=args.smoke),
             "reference_hung": res["hung"], **watch.report()}
    finished = [ref / "compress" / "model"] + [Path(f["checkpoint"]) for f in faults if f.get("checkpoint")]
    result.update(summary(faults, hostile, leaks, finished, _hostile.markers(args.workdir)))
    result.update(faults=faults, bad_inputs=hostile, leaks=leaks["cases"])
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Chaos benchmark: faults injected into real runs of the smoke job, and hostile inputs; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/chaos.py [--workdir /tmp/raycompress-chaos] [--skip-hostile] [--skip-faults]

Every run is the `raycompress` command a user types, as a subprocess on a local Ray (2 CPUs), on
`jobs/smoke.yaml`'s job (a random bf16 Llama of 4 decoder layers, the shipped corpora and tasks):

1. The reference: `raycompress run` undisturbed.
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

JSON keys: faults_injected, runs_finished, runs_identical (output equal to the undisturbed run's),
bad_inputs_tried, bad_inputs_rejected_cleanly, bad_inputs_rejected_before_ray (refused before a
Ray instance started), code_execution_markers (marker files hostile inputs tried to create and
did: must be 0), files_lost_or_corrupted (files of finished runs missing or differing from their
manifest: must be 0), leftover_ray_processes (after the killed driver), and per-case `faults` and
`bad_inputs` lists with seconds and the first error line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "raycompress"]


def run_cli(args: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Run `raycompress ARGS` from the repository root: {rc, seconds, out (stdout + stderr)}."""
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, *map(str, args)], cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "out": proc.stdout}


def clean_refusal(res: dict) -> bool:
    """Exit 1 or 2 with an `error:` line and no Python traceback."""
    return res["rc"] in (1, 2) and "\nerror: " in "\n" + res["out"] and "Traceback (most recent call last)" not in res["out"]


def first_error(out: str) -> str:
    """The first `error:` line of a command's output, else its last line."""
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")] or out.strip().splitlines()[-1:] or [""]
    return lines[0][:300]


def base_job(workdir: Path) -> dict:
    """jobs/smoke.yaml with every path made absolute (the job file is written elsewhere)."""
    import yaml

    job = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    job["model"] = f"random:{REPO / 'jobs' / 'models' / 'smoke-llama'}"
    for src in job["select"]["sources"].values():
        src["path"] = str((REPO / "jobs" / src["path"]).resolve())
    job["storage"] = {"cache_dir": str(workdir / "cache")}
    return job


def write_job(path: Path, job: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/raycompress-chaos"))
    p.add_argument("--skip-faults", action="store_true")
    p.add_argument("--skip-hostile", action="store_true")
    args = p.parse_args()
    import _faults
    import _hostile

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    os.environ.setdefault("RAYCOMPRESS_CACHE_DIR", str(args.workdir / "cache"))
    job = base_job(args.workdir)
    job_file = write_job(args.workdir / "job.yaml", job)
    ref = args.workdir / "ref"
    res = run_cli(["run", job_file, "--output", ref])
    if res["rc"] != 0:
        print(json.dumps({"error": "the undisturbed reference run failed", "tail": res["out"][-3000:]}))
        return 1
    result: dict = {"reference_seconds": res["seconds"]}
    faults = [] if args.skip_faults else _faults.run_all(args.workdir, job, ref)
    hostile = [] if args.skip_hostile else _hostile.run_all(args.workdir, job, ref)
    finished = [ref / "compress" / "model"] + [Path(f["checkpoint"]) for f in faults if f.get("checkpoint")]
    markers = _hostile.markers(args.workdir)
    result.update({
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
        "faults": faults,
        "bad_inputs": hostile,
    })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

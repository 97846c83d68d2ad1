"""Faults for `chaos.py`: each injected into a real `raycompress` command on a copy of the reference
run's finished earlier stages, and compared with the reference. Returns one dict per fault:
{fault, finished, identical, seconds, checkpoint?, detail}."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from chaos import CLI, REPO, clean_refusal, first_error, run_cli, write_job


def copy_stages(ref: Path, out: Path, stages: list[str]) -> Path:
    """A new output folder holding the reference's finished `stages` (folders and state records),
    and what makes the folder a raycompress one (its marker and job record)."""
    from _common import claim

    claim(out)
    for name in stages:
        shutil.copytree(ref / name, out / name)
    shutil.copyfile(ref / "job.json", out / "job.json")
    state = json.loads((ref / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({**state, "stages": {k: state["stages"][k] for k in stages}}))
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "compress" / "model" / "manifest.sha256.json").read_text())["files"]


def metrics(out: Path) -> dict:
    res = json.loads((out / "evaluate" / "results.json").read_text())
    return {m: {t: v["metrics"] for t, v in r["tasks"].items()} for m, r in res.items()}


def _compress_fault(name: str, work: Path, job_file: Path, ref: Path, env: dict) -> dict:
    out = copy_stages(ref, work / name, ["select"])
    res = run_cli(["compress", job_file, "--output", out], env)
    done = res["rc"] == 0
    return {"fault": name, "finished": done, "identical": done and manifest(out) == manifest(ref),
            "seconds": res["seconds"], "hung": res["hung"], "checkpoint": str(out / "compress" / "model") if done else None,
            "detail": "" if done else first_error(res["out"])}


def actor_kills(work: Path, job_file: Path, ref: Path) -> list[dict]:
    out = []
    for phase in ("begin", "stats", "solve", "write"):
        marker = work / f"killed-{phase}"
        env = {"RAYCOMPRESS_CHAOS_KILL_LAYER": "1", "RAYCOMPRESS_CHAOS_KILL_PHASE": phase,
               "RAYCOMPRESS_CHAOS_MARKER": str(marker)}
        r = _compress_fault(f"compress_actor_killed_{phase}", work, job_file, ref, env)
        r["injected"] = marker.exists()
        out.append(r)
    return out


def driver_kill(work: Path, job_file: Path, ref: Path) -> dict:
    """SIGKILL the driver once layer 1 is durable; count its Ray processes alive 30 s later; rerun."""
    import psutil

    out = copy_stages(ref, work / "driver_killed", ["select"])
    proc = subprocess.Popen([*CLI, "compress", str(job_file), "--output", str(out)], cwd=REPO,
                            env={**os.environ, "RAYCOMPRESS_CHAOS_SLOW_LAYER_S": "3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    progress, t0 = out / "compress" / "progress.json", time.monotonic()
    while not (progress.exists() and len(json.loads(progress.read_text())["done"]) >= 2):
        if proc.poll() is not None or time.monotonic() - t0 > 600:
            return {"fault": "driver_sigkill", "finished": False, "identical": False, "detail": "never reached layer 2"}
        time.sleep(0.2)
    family = [p for p in psutil.Process(proc.pid).children(recursive=True)
              if "raycompress.distributed.reaper" not in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    res = run_cli(["compress", job_file, "--output", out])
    done = res["rc"] == 0
    return {"fault": "driver_sigkill", "finished": done, "identical": done and manifest(out) == manifest(ref),
            "seconds": res["seconds"], "checkpoint": str(out / "compress" / "model") if done else None,
            "leftover_ray_processes": len(alive), "replayed_layers": "layer 1/4 done" not in res["out"],
            "detail": "" if done else first_error(res["out"])}


def eval_kill(work: Path, job_file: Path, ref: Path) -> dict:
    out = copy_stages(ref, work / "eval_killed", ["select", "compress"])
    marker = work / "killed-eval"
    res = run_cli(["evaluate", job_file, "--output", out],
                  {"RAYCOMPRESS_CHAOS_KILL_EVAL_UNIT": "1", "RAYCOMPRESS_CHAOS_MARKER": str(marker)})
    done = res["rc"] == 0
    return {"fault": "eval_actor_killed", "finished": done, "identical": done and metrics(out) == metrics(ref),
            "injected": marker.exists(), "seconds": res["seconds"], "hung": res["hung"], "detail": "" if done else first_error(res["out"])}


def select_kill(work: Path, job_file: Path, ref: Path) -> dict:
    out = work / "select_killed"
    marker = work / "killed-select"
    label = Path(json.loads((ref / "job.json").read_text())["select"]["sources"]["biomed"]["path"]).name
    res = run_cli(["select", job_file, "--output", out],
                  {"RAYCOMPRESS_CHAOS_KILL_READ_FILE": label, "RAYCOMPRESS_CHAOS_MARKER": str(marker)})
    done = res["rc"] == 0
    fp = lambda o: json.loads((o / "select" / "manifest.json").read_text())["fingerprint"]  # noqa: E731
    return {"fault": "select_read_task_killed", "finished": done, "identical": done and fp(out) == fp(ref),
            "injected": marker.exists(), "seconds": res["seconds"], "hung": res["hung"], "detail": "" if done else first_error(res["out"])}


def disk_full(work: Path, job_file: Path, ref: Path) -> dict:
    """The output on a tmpfs sized for the select stage and 1.5 layer shards: refused naming the
    shard; nothing partial; the disk grown and the command run again."""
    disk = work / "disk"
    disk.mkdir()
    shard = (ref / "compress" / "model" / "model-00001-of-00005.safetensors").stat().st_size
    used = sum(f.stat().st_size for f in (ref / "select").rglob("*") if f.is_file())
    size_k = (used + int(1.5 * shard)) // 1024 + 64
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        return {"fault": "disk_full", "skipped": "mounting a tmpfs needs root", "finished": False, "identical": False}
    try:
        out = copy_stages(ref, disk / "out", ["select"])
        full = run_cli(["compress", job_file, "--output", out])
        partial = [str(p) for p in out.rglob("*.tmp")]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        res = run_cli(["compress", job_file, "--output", out])
        done = res["rc"] == 0
        return {"fault": "disk_full", "finished": done, "identical": done and manifest(out) == manifest(ref),
                "refused_cleanly": clean_refusal(full), "error": first_error(full["out"]), "partial_files": partial,
                "seconds": full["seconds"] + res["seconds"], "detail": "" if done else first_error(res["out"])}
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def small_object_store(work: Path, job: dict, ref: Path) -> dict:
    small = write_job(work / "jobs" / "small-store.yaml", {**job, "ray": {**job["ray"], "object_store_memory": 78643200}})
    return _compress_fault("object_store_75mib", work, small, ref, {})


def busy_and_changed(work: Path, job_file: Path, job: dict, ref: Path) -> list[dict]:
    """A second run on a folder a running one holds; a rerun whose sparsity differs from the folder's."""
    out = copy_stages(ref, work / "busy", ["select"])
    first = subprocess.Popen([*CLI, "compress", str(job_file), "--output", str(out)], cwd=REPO,
                             env={**os.environ, "RAYCOMPRESS_CHAOS_SLOW_LAYER_S": "2"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / ".lock").exists() and first.poll() is None:
        time.sleep(0.2)
    second = run_cli(["compress", job_file, "--output", out])
    first.wait()
    changed = write_job(work / "jobs" / "sparsity60.yaml", {**job, "compress": {**job["compress"], "sparsity": 0.6}})
    third = run_cli(["compress", changed, "--output", out])
    done = first.returncode == 0
    return [{"fault": "second_run_on_busy_folder", "finished": done, "identical": done and manifest(out) == manifest(ref),
             "refused_cleanly": clean_refusal(second), "error": first_error(second["out"]),
             "checkpoint": str(out / "compress" / "model") if done else None},
            {"fault": "rerun_with_changed_recipe", "finished": True, "identical": manifest(out) == manifest(ref),
             "refused_cleanly": clean_refusal(third) and "sparsity" in third["out"], "error": first_error(third["out"])}]


def run_all(work: Path, job: dict, ref: Path) -> list[dict]:
    job_file = work / "job.yaml"
    faults = actor_kills(work, job_file, ref)
    faults.append(driver_kill(work, job_file, ref))
    faults.append(eval_kill(work, job_file, ref))
    faults.append(select_kill(work, job_file, ref))
    faults.append(disk_full(work, job_file, ref))
    faults.append(small_object_store(work, job, ref))
    faults += busy_and_changed(work, job_file, job, ref)
    return faults

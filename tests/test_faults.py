"""Faults injected into real runs of the tiny job (tests/conftest.py `tiny_job_run` is the undisturbed
reference): a compression actor killed in each phase of a layer, the driver SIGKILLed mid-compress
and the command run again, the output disk filling up. Each ends in the reference's bytes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _with_select(ref: Path, out: Path) -> Path:
    """A new output folder holding the reference run's finished select stage only."""
    shutil.copytree(ref / "select", out / "select")
    shutil.copy(ref / ".raycompress", out / ".raycompress")  # the folder is ours, as the reference run's
    state = json.loads((ref / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({"stages": {"select": state["stages"]["select"]}}))
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "compress" / "model" / "manifest.sha256.json").read_text())["files"]


def _cli(job: Path, out: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raycompress", "compress", str(job), "--output", str(out), *args],
                            cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.parametrize("phase", ["stats", "solve", "write"])
def test_compress_actor_killed_mid_layer(tiny_job_dir, tiny_job_run, tmp_path, monkeypatch, phase):
    from raycompress.config import load_config
    from raycompress.distributed.orchestrator import Stage, run_job

    out = _with_select(tiny_job_run, tmp_path / "out")
    monkeypatch.setenv("RAYCOMPRESS_CHAOS_KILL_LAYER", "1")
    monkeypatch.setenv("RAYCOMPRESS_CHAOS_KILL_PHASE", phase)
    monkeypatch.setenv("RAYCOMPRESS_CHAOS_MARKER", str(tmp_path / "killed"))
    run_job(load_config(tiny_job_dir / "job.yaml"), out, [Stage.COMPRESS], tiny_job_dir / "model")
    assert (tmp_path / "killed").exists()
    assert json.loads((out / "compress" / "compression.json").read_text())["restarts"] == 1
    assert _manifest(out) == _manifest(tiny_job_run)


def test_driver_killed_then_rerun_resumes_byte_identical(tiny_job_dir, tiny_job_run, tmp_path):
    """SIGKILL the driver (only its process, as an OOM killer would) once layer 0 is durable; the same
    command again replays layer 0 from its shard and compresses layer 1; no Ray process of the dead
    driver's local cluster is left running."""
    out = _with_select(tiny_job_run, tmp_path / "out")
    job = tiny_job_dir / "job.yaml"
    first = _cli(job, out, {"RAYCOMPRESS_CHAOS_SLOW_LAYER_S": "4"})
    progress = out / "compress" / "progress.json"
    deadline = time.monotonic() + 240
    while not (progress.exists() and json.loads(progress.read_text())["done"] == [0]):
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "layer 0 never finished"
        time.sleep(0.2)
    ray_procs = [p for p in psutil.Process(first.pid).children(recursive=True)
                 if "raycompress.distributed.reaper" not in " ".join(p.cmdline())]
    assert any("raylet" in " ".join(p.cmdline()) for p in ray_procs)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    _gone, alive = psutil.wait_procs(ray_procs, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]  # e.g. ray::DashboardAgent before the reaper
    again = _cli(job, out, {})
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log[-3000:]
    assert "layer 2/2 done" in log and "layer 1/2 done" not in log  # layer 0 replayed, not recompressed
    assert _manifest(out) == _manifest(tiny_job_run)
    assert not list(out.rglob("*.tmp"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_names_the_file_then_rerun_completes(tiny_job_dir, tiny_job_run, tmp_path):
    """The output on a 240 KiB tmpfs: the first layer shard fits, the second does not. The error names
    the shard and the bytes it needed, is not retried, and leaves no partial file; after the disk grows,
    the same command finishes with the reference's bytes."""
    from raycompress.config import load_config
    from raycompress.distributed.orchestrator import Stage, run_job
    from raycompress.distributed.restarts import StageFailed

    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "240k"):
        pytest.skip("mounting a size-limited tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        out = _with_select(tiny_job_run, disk / "out")
        job = load_config(tiny_job_dir / "job.yaml")
        with pytest.raises(StageFailed, match=r"DiskFull: .*no space left .*model-00002-of-00003\.safetensors"
                                              r".* it needs \d+ bytes, \d+ bytes are free") as err:
            run_job(job, out, [Stage.COMPRESS], tiny_job_dir / "model")
        assert "restart" not in str(err.value)
        assert not list(out.rglob("*.tmp")) and not (out / "compress" / "model" / "model-00002-of-00003.safetensors").exists()
        assert json.loads((out / "compress" / "progress.json").read_text())["done"] == [0]
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        run_job(job, out, [Stage.COMPRESS], tiny_job_dir / "model")
        assert _manifest(out) == _manifest(tiny_job_run)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

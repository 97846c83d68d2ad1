"""Ray Jobs against a real head: `ray start --head --block` on 127.0.0.1 with free ports, its own
--temp-dir and token authentication, killed by its PID at the end (never `ray stop`, which would
stop every Ray on the machine). `raycompress submit jobs/smoke.yaml --wait` must succeed and
write the outputs; the head's Prometheus endpoint must carry raycompress's metrics while it runs;
a second submission stopped mid-compress and resubmitted to the same output must resume (finished
stages and layers kept) and give the same checkpoint.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from raycompress import submit as jobs
from raycompress.distributed.metrics import prometheus_names

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real local head; yields (dashboard address, metrics URL, client environment)."""
    temp = tempfile.mkdtemp(prefix="rch", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, metrics, client, agent, agent_grpc, env_agent, nm, om = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": secrets.token_hex(16), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "RAYCOMPRESS_CACHE_DIR": str(tmp_path_factory.mktemp("head-cache")),
                "RAYCOMPRESS_CHAOS_SLOW_LAYER_S": "3"})  # 4 layers of >= 3 s: time to stop mid-compress
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--temp-dir={temp}", "--num-cpus=2",
           "--include-dashboard=true"]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(address, env, proc, Path(temp) / "head.log")
        yield address, f"http://127.0.0.1:{metrics}/metrics", env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the head and everything it started, by PID
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:  # stragglers of the group (a GCS or monitor that outlived `ray start`)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict, proc, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        r = _cli(env, "status", "raysubmit_none", "--address", address, check=False)
        if "Connection" not in r.stderr and "connect" not in r.stderr.lower():
            return
        time.sleep(1)
    raise TimeoutError(f"the head's Jobs API did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def _cli(env: dict, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "raycompress", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class _Scraper(threading.Thread):
    """Polls a Prometheus endpoint and keeps the names of the raycompress series it saw."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.names, self.done = url, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(2):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            self.names |= {ln.split("{")[0].split(" ")[0] for ln in text.splitlines()
                           if ln.startswith("ray_raycompress_")}


def _status(env: dict, address: str, job_id: str) -> str:
    return json.loads(_cli(env, "status", job_id, "--address", address).stdout)["status"]


def _outputs_ok(out: Path) -> dict:
    state = json.loads((out / "state.json").read_text())["stages"]
    assert list(state) == ["select", "compress", "evaluate", "report"]
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert set(results["compressed"]["tasks"]) == {"biomed_abstracts", "piqa"}
    assert (out / "report.md").is_file()
    return json.loads((out / "compress" / "model" / "manifest.sha256.json").read_text())


def test_submit_smoke_job_and_scrape_metrics(head, tmp_path):
    address, metrics_url, env = head
    scraper = _Scraper(metrics_url)
    scraper.start()
    t0 = time.monotonic()
    r = _cli(env, "submit", str(SMOKE), "--address", address, "--output", str(tmp_path / "out"), "--wait")
    seconds = time.monotonic() - t0
    time.sleep(6)  # one more export interval after the job
    scraper.done.set()
    scraper.join()
    job_id = r.stdout.splitlines()[0]
    assert r.stdout.rstrip().endswith(f"{job_id}: SUCCEEDED")
    _outputs_ok(tmp_path / "out")
    status = json.loads(_cli(env, "status", job_id, "--address", address).stdout)
    assert status["status"] == "SUCCEEDED" and status["metadata"]["raycompress_job"] == "smoke"
    assert "stage compress" in _cli(env, "logs", job_id, "--address", address).stdout
    expected = prometheus_names()
    assert expected <= scraper.names, f"missing {sorted(expected - scraper.names)}; scraped {sorted(scraper.names)}"
    print(f"smoke job submitted and finished in {seconds:.1f} s; metrics: {sorted(scraper.names)}")


def test_stopped_submission_resumes(head, tmp_path):
    address, _, env = head
    out = tmp_path / "out"
    job_id = _cli(env, "submit", str(SMOKE), "--address", address, "--output", str(out)).stdout.split()[0]
    progress = out / "compress" / "progress.json"
    deadline = time.monotonic() + 300
    while not (progress.is_file() and json.loads(progress.read_text())["done"]):
        assert time.monotonic() < deadline, _cli(env, "logs", job_id, "--address", address).stdout[-3000:]
        time.sleep(0.2)
    _cli(env, "stop", job_id, "--address", address)
    while (status := _status(env, address, job_id)) not in jobs.TERMINAL:
        assert time.monotonic() < deadline, status
    assert status == "STOPPED"
    before = json.loads(progress.read_text())
    state = json.loads((out / "state.json").read_text())["stages"]
    assert "select" in state and "compress" not in state, "stopped too late: compress had finished"
    r = _cli(env, "submit", str(SMOKE), "--address", address, "--output", str(out), "--wait")
    assert r.stdout.rstrip().endswith("SUCCEEDED")
    assert "stage select already finished" in r.stdout
    after = json.loads(progress.read_text())
    for i in map(str, before["done"]):  # layers finished before the stop were kept, not recompressed
        assert after["layers"][i] == before["layers"][i]
    assert len(after["done"]) > len(before["done"])
    _outputs_ok(out)


def test_relative_output_is_refused(head):
    address, _, env = head
    r = _cli(env, "submit", str(SMOKE), "--address", address, "--output", "runs/smoke", check=False)
    assert r.returncode == 2 and "relative" in r.stderr and "s3://" in r.stderr  # (run: tests/test_cli.py)


def test_submit_without_token_mode_says_what_to_set(head, tmp_path):
    """A client without RAY_AUTH_MODE=token against a token-auth head: one line naming the cluster
    and the variables to set, exit 2, no traceback."""
    address, _, env = head
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bare["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    r = _cli(bare, "submit", str(SMOKE), "--address", address, "--output", str(tmp_path / "out"), check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: the cluster at {address} requires token authentication")
    assert "export RAY_AUTH_MODE=token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0]


class _RefusingClient:
    """A JobSubmissionClient whose cluster answers 401 / 403, as Ray's SDK raises it."""

    status = 401

    def __init__(self, address=None, **_):
        from ray.exceptions import AuthenticationError

        what = "Authentication required" if self.status == 401 else "Authentication failed"
        raise AuthenticationError(f"{what}: Unauthorized\n\nToken authentication is enabled but ...")


def test_auth_refusal_is_one_line(monkeypatch, tmp_path):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _RefusingClient)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(jobs.AuthRequired) as exc:
        jobs.submit(SMOKE, str(tmp_path / "out"), "http://10.0.0.5:8265")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("the cluster at http://10.0.0.5:8265 requires token authentication")
    assert "export RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN=" in msg and "RAY_AUTH_TOKEN_PATH=" in msg
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the mode is right; the token is wrong
    monkeypatch.setattr(_RefusingClient, "status", 403)
    with pytest.raises(jobs.AuthRequired, match=r"rejected this client's token \(RAY_AUTH_MODE=token is set\)"):
        jobs.status("raysubmit_x", "http://10.0.0.5:8265")


def test_entrypoint_checks_its_interpreter_first():
    req = jobs.job_request(SMOKE, "/tmp/raycompress-out")
    modules = jobs.dependency_modules()
    assert {"pyarrow", "torch", "ray", "yaml", "transformers"} <= set(modules)
    check, run = req["entrypoint"].split(" && ")
    assert check == jobs.interpreter_check(modules)
    assert run.startswith("python -m raycompress run jobs/smoke.yaml --output /tmp/raycompress-out")


def test_interpreter_without_dependencies_fails_in_one_line():
    """The entrypoint's check, run by the shell as Ray runs it: silent where every module imports;
    else exit 1 and one line naming the interpreter, what it lacks and what to do."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    ok = subprocess.run(jobs.interpreter_check(jobs.dependency_modules()), shell=True, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    bad = subprocess.run(jobs.interpreter_check(["json", "no_such_module_xyz"]), shell=True, env=env,
                         capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr
    assert lines[0].startswith(f"error: the job runs {BIN / 'python'}, which lacks no_such_module_xyz (")
    assert "ray start --head" in lines[0] and "PATH" in lines[0]

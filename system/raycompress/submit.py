"""Ray Jobs: submit a job file to a cluster's Job Submission server, and watch or stop it.

`submit` validates the job file here, then sends it with a runtime environment that carries the
project (its repository folder as `working_dir`: job files, task files, shipped data; the package
itself as a `py_module`, so the cluster runs the code you submitted) and runs
`python -m raycompress run <job file> --output <location>` on the head. Ray runs that entrypoint
as a shell command in the environment the head was started with, so `python` is the first one on
the PATH of whoever ran `ray start --head` (not the interpreter of the `ray` script itself): the
entrypoint first checks that this interpreter can import the project's dependencies and, if not,
the job fails with one line naming the interpreter and what is missing (`interpreter_check`).
The output must be a URI
or an absolute path on a volume every node mounts: a relative path would land in Ray's temporary
copy of the working directory and be lost when the job ends, so it is refused.

The cluster is `--address` (the dashboard's HTTP address, e.g. http://127.0.0.1:8265), else
$RAY_API_SERVER_ADDRESS / $RAY_ADDRESS as `ray job submit` reads them. With token authentication
(Ray's default for new clusters since 2.5x), the client needs RAY_AUTH_MODE=token and the cluster's
token: $RAY_AUTH_TOKEN, or a file at $RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token); `ray
get-auth-token` on the head prints it. A refused client gets one line saying so (`AuthRequired`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

# what never travels in the working_dir: environments, outputs, caches, VCS data
EXCLUDES = [".venv", ".venv-peer", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", "shared",
            "*.safetensors", "*.gguf"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(ValueError):
    """A submission refused before it reaches the cluster; the message says what and why."""


class AuthRequired(SubmitError):
    """The cluster's Jobs API refused this client (HTTP 401 / 403): token authentication."""


def _auth_hint(address: str | None, detail: str) -> str:
    """One line: which cluster refused, and the variables to set (Ray 2.60's names)."""
    where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "the default address"
    token = ("the cluster's token as RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (default ~/.ray/auth_token; "
             "`ray get-auth-token` on the head prints it)")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return f"the cluster at {where} requires token authentication: export RAY_AUTH_MODE=token and {token}"
    what = "rejected this client's token" if "failed" in detail.lower() else "found no token for this client"
    return f"the cluster at {where} {what} (RAY_AUTH_MODE=token is set): export {token}"


@contextlib.contextmanager
def _auth_errors(address: str | None):
    """Ray's multi-line AuthenticationError (and its traceback) as one `AuthRequired` line."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise AuthRequired(_auth_hint(address, getattr(exc, "message", str(exc)))) from None


def dependency_modules() -> list[str]:
    """Top-level modules of raycompress's required dependencies, from its installed metadata
    (pyproject.toml's `dependencies`; extras left out); a distribution's import name is its
    name in lower case with '-' as '_', except PyYAML (yaml)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("raycompress") or []
    except PackageNotFoundError:
        return []
    names = [re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r]
    return sorted({{"pyyaml": "yaml"}.get(n, n.replace("-", "_")) for n in names})


def interpreter_check(modules: list[str]) -> str:
    """A shell command that exits 0 where `python` can import every one of `modules` (passed as
    its arguments), else exits 1 printing one line: the interpreter, what it lacks, and how the
    head chooses it."""
    code = ("import importlib.util as u, sys\n"
            "m = [n for n in sys.argv[1:] if u.find_spec(n) is None]\n"
            "m and sys.exit(\"error: the job runs \" + sys.executable + \", which lacks \" + \", \".join(m) + \" (raycompress "
            "dependencies): the head runs `python` from the PATH it was started with; restart it with the "
            "project environment first on PATH (source .venv/bin/activate, or PATH=/path/to/.venv/bin:$PATH, "
            "then ray start --head ...)\")")
    return shlex.join(["python", "-c", code, *modules])


def project_root(start: Path) -> Path | None:
    """The raycompress repository that holds `start` (first parent with pyproject.toml and
    system/raycompress), or None."""
    for parent in [start, *start.parents]:
        if (parent / "pyproject.toml").is_file() and (parent / "system" / "raycompress").is_dir():
            return parent
    return None


def check_output(output: str) -> str:
    """`output` if every node can reach it: a URI or an absolute path.

    Raises:
        SubmitError: a relative path (it would resolve inside Ray's copy of the working directory).
    """
    if "://" in output or os.path.isabs(os.path.expanduser(output)):
        return os.path.expanduser(output)
    raise SubmitError(f"--output '{output}' is relative: on the cluster it would land in Ray's temporary copy "
                      "of the working directory, deleted when the job ends. Give a URI (s3://bucket/runs/x, "
                      "gs://...) or an absolute path on a volume every node mounts")


def job_request(job_file: Path, output: str, extra_args: list[str] | None = None) -> dict:
    """The keyword arguments of `JobSubmissionClient.submit_job` for `job_file` (validated here).

    Raises:
        ConfigError: the job file does not validate.
        SubmitError: the output is relative.
    """
    from raycompress.config import load_config

    job = load_config(job_file)  # errors name the file and field, before anything is sent
    output = check_output(output)
    job_file = job_file.resolve()
    root = project_root(job_file.parent)
    working_dir = root or job_file.parent  # outside the repository: the job file's own folder
    rel = job_file.relative_to(working_dir).as_posix()
    package = Path(__file__).resolve().parent
    entry = ["python", "-m", "raycompress", "run", rel, "--output", output, *(extra_args or [])]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return {
        "entrypoint": f"{interpreter_check(dependency_modules())} && {shlex.join(entry)}",
        "submission_id": f"raycompress-{job.name}-{stamp}-{os.urandom(2).hex()}",
        "runtime_env": {"working_dir": str(working_dir), "py_modules": [str(package)], "excludes": EXCLUDES,
                        "env_vars": dict(OFFLINE_ENV)},
        "metadata": {"raycompress_job": job.name, "job_file": rel, "output": output},
    }


def client(address: str | None):
    """A `JobSubmissionClient` for `address` (None: Ray's own lookup, $RAY_API_SERVER_ADDRESS /
    $RAY_ADDRESS).

    Raises:
        AuthRequired: the cluster requires a token this client does not send (one line: what to set).
    """
    from ray.job_submission import JobSubmissionClient

    with _auth_errors(address):
        return JobSubmissionClient(address)


def submit(job_file: Path, output: str, address: str | None = None, extra_args: list[str] | None = None) -> str:
    """Submit `job_file`; returns the submission id. Raises as `job_request`, and Ray's
    connection errors when the address cannot be reached."""
    req = job_request(job_file, output, extra_args)
    c = client(address)
    with _auth_errors(address):
        job_id = c.submit_job(**req)
    log.info("submitted %s as %s: %s", job_file, job_id, req["entrypoint"])
    return job_id


def wait(job_id: str, address: str | None = None, on_log=None, poll_s: float = 2.0,
         timeout_s: float | None = None) -> str:
    """Block until the job ends, handing each new piece of its log to `on_log(text)` (if given);
    returns its final status.

    Raises:
        TimeoutError: still running after `timeout_s`.
    """
    c = client(address)
    shown, t0 = 0, time.monotonic()
    while True:
        status = str(c.get_job_status(job_id).value)
        if on_log:
            logs = c.get_job_logs(job_id)
            on_log(logs[shown:])
            shown = len(logs)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def status(job_id: str, address: str | None = None) -> dict:
    """The job's status, message, times (Unix ms) and metadata."""
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time,
            "metadata": info.metadata}


def logs(job_id: str, address: str | None = None) -> str:
    """The job's log so far."""
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop the job (its driver gets SIGTERM; finished layers stay at the
    output, so a resubmission resumes). Returns whether a stop was requested."""
    return bool(client(address).stop_job(job_id))

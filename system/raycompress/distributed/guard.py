"""What keeps an output folder consistent across runs: one holder at a time, and no stage reused
by a job it does not belong to.

`OutputLock`: `<out>/.lock` (JSON: host, pid, start, heartbeat) taken before any stage runs and
refreshed every `HEARTBEAT_S` by a thread; a second run on the same folder refuses, naming the
holder. A lock is stale when its holder is a dead process on this host, or when its heartbeat is
older than `STALE_S` (a driver killed on another node), so a killed run's rerun resumes.
On object storage there is no create-if-absent: the lock is written, then read back after a short
wait, and the run that reads another token backs off.

`claim_output`: an output folder is ours or empty. A folder raycompress creates gets the marker
`<out>/.raycompress`; a non-empty folder without it (an unrelated folder, another tool's run, a
file), the filesystem root, the user's home or one of its parents, and a bucket's root are refused
before anything is written or deleted there.

`input_contents` / `stage_inputs` / `check_stages`: each finished stage records in `state.json`
what determined it: the SHA-256 of every byte of the model's files, of every corpus file and of
every evaluation task's files (its YAML, includes and data), and the config sections it reads. A
rerun whose inputs differ refuses to reuse that stage, naming every file or field that differs,
unless `--force-stage` redoes it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from raycompress.config import JobConfig
from raycompress.models.fetch import ModelRef
from raycompress.storage import uri

HEARTBEAT_S = 20.0
STALE_S = 90.0


class OutputBusy(RuntimeError):
    """Another live run holds the output folder."""


class StageMismatch(ValueError):
    """A finished stage in the output folder was made by a different job."""


class ForeignOutput(ValueError):
    """The output folder is not one raycompress made (or may not be used as one)."""


MARKER = ".raycompress"


def _forbidden(out_dir: str) -> str | None:
    """Why `out_dir` may never be an output folder, or None."""
    if not uri.is_local(out_dir):
        return "a bucket's root" if not uri.resolve(out_dir)[1].strip("/").partition("/")[2] else None
    path, home = uri.local_path(out_dir).resolve(), Path.home().resolve()
    if path == Path(path.anchor):
        return "the filesystem root"
    if path == home or path in home.parents:
        return "the user's home folder" if path == home else f"a parent of the user's home folder {home}"
    return None


def _legacy(out_dir: str, names: list[str]) -> bool:
    """A run folder written before the marker existed: job.json and a state.json of our shape."""
    if not {"job.json", "state.json"} <= set(names):
        return False
    try:
        state = json.loads(uri.read_text(uri.join(out_dir, "state.json")))
    except (ValueError, OSError):
        return False
    return (isinstance(state, dict) and set(state) == {"stages"} and isinstance(state["stages"], dict)
            and all(isinstance(v, dict) for v in state["stages"].values()))


def claim_output(out_dir: str) -> None:
    """Make `out_dir` (local path or URI) ours, or refuse it before anything is written there:
    a missing or empty folder gets the marker `MARKER`; a folder with the marker is ours; a run
    folder from before the marker (`_legacy`) is adopted.

    Raises:
        ForeignOutput: `out_dir` is a file, the filesystem root, the home folder or a parent of it,
            a bucket's root, or a non-empty folder raycompress did not make; the message names it.
    """
    shown = uri.display(out_dir)
    why = _forbidden(out_dir)
    if why:
        raise ForeignOutput(f"--output {shown} is {why}; give a folder of its own (e.g. {uri.join(shown, 'runs', 'job')})")
    if uri.info(out_dir).type == uri.pafs.FileType.File:
        raise ForeignOutput(f"--output {shown} is a file, not a folder")
    names = uri.listdir(out_dir, folders=True)
    if MARKER in names:
        return
    if names and not _legacy(out_dir, names):
        raise ForeignOutput(f"--output {shown} is not empty ({len(names)} entries, e.g. {names[:3]}) and was not made by "
                            f"raycompress (no {MARKER} marker): nothing there was touched; give an empty or new folder")
    uri.write_text(uri.join(out_dir, MARKER), json.dumps({"made_by": "raycompress", "created": time.time()}))


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


def input_contents(job: JobConfig, model: ModelRef) -> dict[str, dict]:
    """What the job reads, by content: {"model": {file: sha256}, "corpora": {source: {label:
    sha256}}, "tasks": {task: sha256}}. Digests come from the node's digest cache
    (`storage.cache.NodeCache.digest`), so a rerun on unchanged files stats them instead of reading
    them; corpus files are hashed in parallel threads.

    Raises:
        FileNotFoundError: a model file is missing. CorpusPathError: a source matches no file.
        TaskError: a task cannot be resolved.
    """
    from concurrent.futures import ThreadPoolExecutor

    from raycompress.data.readers import expand_paths
    from raycompress.evaluation.taskfiles import resolve_tasks, task_digest
    from raycompress.storage.cache import NodeCache

    cache = NodeCache(job.storage.cache_dir)
    files = {name: expand_paths(src.path, job.base_dir) for name, src in sorted(job.select.sources.items())}
    todo = [(name, loc, label) for name, found in files.items() for loc, label in found.items()]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo)))) as pool:
        digests = list(pool.map(lambda t: cache.digest(t[1]), todo))
    corpora: dict[str, dict[str, str]] = {name: {} for name in files}
    for (name, _, label), digest in zip(todo, digests):
        corpora[name][label] = digest
    tasks = {t.name: task_digest(t, job.resolve, cache.digest) for t in resolve_tasks(job)}
    return {"model": model.content_digests(), "corpora": corpora, "tasks": tasks}


def stage_inputs(job: JobConfig, contents: dict[str, dict]) -> dict[str, dict]:
    """Per stage, what determines its output (each stage also depends on the ones before it):
    the contents it reads (`input_contents`) and the config sections it uses."""
    select = {"model": contents["model"], "corpora": contents.get("corpora", {}),
              "select": job.select.model_dump(mode="json")}
    compress = {**select, "compress": job.compress.model_dump(mode="json")}
    ev = {"evaluate": job.evaluate.model_dump(mode="json", include={"tasks", "include_dense", "dtype"}),
          "tasks": contents.get("tasks", {})}
    if job.train is None:
        return {"select": select, "compress": compress, "evaluate": {**compress, **ev}}
    train = {**compress, "train": job.train.model_dump(mode="json")}
    return {"select": select, "compress": compress, "train": train, "evaluate": {**train, **ev}}


def _leaves(d, prefix: str = "") -> dict[str, object]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
    return out


def _shown(v) -> str:
    """A recorded value for a message: a SHA-256 as 'content sha256 <12 hex>'."""
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return f"content sha256 {v[:12]}"
    return "(unset)" if v is None else repr(v)


def differences(recorded: dict, current: dict) -> list[str]:
    """'field: recorded -> current' for every leaf that differs (a changed file shows as
    'model.<file>', 'corpora.<source>.<file>' or 'tasks.<task>' with both content digests)."""
    a, b = _leaves(recorded), _leaves(current)
    return [f"{k}: {_shown(a.get(k))} in the folder, {_shown(b.get(k))} in this job"
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

"""Leaks for `chaos.py`: inputs edited after a finished run (a stale result must never be reused),
output folders that are not ours (nothing there may be touched), and the sockets a local run
listens on (loopback only). Returns one dict per case: {case, kind, rc, seconds, hung, ...}.

The reference job reads private copies of its inputs (`private_inputs`), so that a case can edit
one, rerun a stage on a copy of the reference folder, and put the original bytes back.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import threading
from pathlib import Path

from chaos import clean_refusal, first_error, run_cli

OURS = {"job.json", "state.json", ".lock", ".raycompress", "select", "compress", "train", "evaluate",
        "report.json", "report.md", "report.html"}  # what a run may create at the top of its output


def private_inputs(work: Path, job: dict) -> dict:
    """`job` reading copies under `work`: the model as a plain folder (a `random:` model built once),
    each corpus file, and each named task file (from jobs/tasks) with its data file beside it."""
    import yaml

    from raycompress.evaluation.taskfiles import builtin_task_dir
    from raycompress.models.fetch import resolve_model

    model = work / "inputs" / "model"
    if not model.is_dir():
        shutil.copytree(resolve_model(job["model"], job.get("base_dir", "."), job["storage"]["cache_dir"]).local(), model)
    sources = {}
    for name, src in job["select"]["sources"].items():
        copy = work / "inputs" / "corpora" / Path(src["path"]).name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src["path"], copy)
        sources[name] = {**src, "path": str(copy)}
    tasks = work / "inputs" / "tasks"
    (tasks / "data").mkdir(parents=True, exist_ok=True)
    for entry in job["evaluate"]["tasks"]:
        src = Path(builtin_task_dir()) / f"{entry['name']}.yaml"
        task = yaml.safe_load(src.read_text())
        data = (src.parent / task["path"]).resolve()
        shutil.copyfile(data, tasks / "data" / data.name)
        (tasks / src.name).write_text(yaml.safe_dump({**task, "path": f"data/{data.name}"}, sort_keys=False))
    return {**job, "model": str(model), "select": {**job["select"], "sources": sources},
            "evaluate": {**job["evaluate"], "task_dirs": [str(tasks)]}}


class ListenWatch:
    """Samples the TCP sockets a process tree listens on, every 0.5 s while it runs."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int, str]] = set()
        self._stop = threading.Event()

    def start(self, pid: int):
        """Begin sampling `pid`'s tree; returns the callable that stops it (chaos.run_cli's on_start)."""
        th = threading.Thread(target=self._sample, args=(pid,), daemon=True)
        th.start()

        def stop() -> None:
            self._stop.set()
            th.join()
        return stop

    def _sample(self, pid: int) -> None:
        import psutil

        while not self._stop.wait(0.5):
            try:
                root = psutil.Process(pid)
                tree = {root.pid: root.name()} | {c.pid: c.name() for c in root.children(recursive=True)}
                conns = psutil.net_connections(kind="tcp")
            except psutil.Error:
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN and c.pid in tree:
                    self.seen.add((c.laddr.ip, c.laddr.port, tree[c.pid]))

    def report(self) -> dict:
        """{listening: ["ip:port", ...] (each socket once), ports_on_non_loopback: ["ip:port process", ...]
        for sockets outside 127.0.0.0/8 and ::1 (an IPv4-mapped IPv6 address counts as its IPv4)}."""
        outside = {f"{ip}:{port}": name for ip, port, name in self.seen if not _loopback(ip)}
        return {"listening": sorted({f"{ip}:{port}" for ip, port, _ in self.seen}),
                "ports_on_non_loopback": sorted(f"{k} {v}" for k, v in outside.items())}


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or ::ffff:127.x.y.z."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _tree(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder` (symlinks not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _rerun(name: str, stage: str, work: Path, ref: Path, edit, what: str) -> dict:
    """Copy the reference, `edit()` one input (it returns the undo), rerun `stage`, undo. A rerun
    that prints "already finished" for the stage reused a stale result."""
    out = work / "leaks" / name
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns(".lock"))
    undo = edit()
    try:
        res = run_cli([stage, work / "job.yaml", "--output", out], timeout=600)
    finally:
        undo()
    stale = res["rc"] == 0 and f"{stage} already finished" in res["out"]
    return {"case": name, "kind": "stale_input", "stage": stage, "rc": res["rc"], "seconds": res["seconds"],
            "hung": res["hung"], "stale_reuse": stale, "refused_cleanly": clean_refusal(res),
            "names_change": what in res["out"], "redone": res["rc"] == 0 and not stale, "error": first_error(res["out"])}


def _edit(path: Path, change) -> callable:
    """Write `change(original bytes)` to `path` in place (same inode); returns the undo."""
    original = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(change(original))
        f.truncate()
    return lambda: path.write_bytes(original)


def _flip_signs(data: bytes) -> bytes:
    """The same bytes with the top bit of every other byte flipped over the middle quarter of the
    file (size unchanged; away from the header and both ends, where a sampled fingerprint looks)."""
    buf = bytearray(data)
    for i in range(len(buf) * 3 // 8 | 1, len(buf) * 5 // 8, 2):
        buf[i] ^= 0x80
    return bytes(buf)


def stale_cases(work: Path, job: dict, ref: Path, smoke: bool) -> list[dict]:
    """Inputs edited after the reference finished; each rerun on a copy of it."""
    import yaml

    corpus = Path(next(iter(job["select"]["sources"].values()))["path"])
    cut = lambda b: b"".join(b.splitlines(keepends=True)[: max(1, len(b.splitlines()) // 4)])  # noqa: E731
    cases = [_rerun("corpus_truncated", "select", work, ref, lambda: _edit(corpus, cut), corpus.name)]
    if smoke:
        return cases
    model = Path(job["model"])
    shard = max(model.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    tasks = Path(job["evaluate"]["task_dirs"][0])
    task = tasks / f"{job['evaluate']['tasks'][0]['name']}.yaml"
    data = next((tasks / "data").iterdir())
    retemplate = lambda b: yaml.safe_dump({**yaml.safe_load(b), "prompt": "Abstract: {{text}}"}).encode()  # noqa: E731
    cases += [_rerun("weights_edited_in_place", "select", work, ref, lambda: _edit(shard, _flip_signs), shard.name),
              _rerun("task_template_edited", "evaluate", work, ref, lambda: _edit(task, retemplate), task.stem),
              _rerun("task_data_edited", "evaluate", work, ref, lambda: _edit(data, cut), task.stem)]  # a task by its name
    return cases


def _foreign(name: str, folder: Path, job_file: Path, stage: str = "run", timeout: float = 600) -> dict:
    """Run `stage` with --output `folder` (not ours); count its files written, changed or deleted."""
    before = _tree(folder)
    res = run_cli([stage, job_file, "--output", folder], timeout=timeout)
    after = _tree(folder)
    touched = sorted({k for k in before if after.get(k) != before[k]} | (set(after) - set(before)))
    return {"case": name, "kind": "foreign_output", "rc": res["rc"], "seconds": res["seconds"], "hung": res["hung"],
            "refused_cleanly": clean_refusal(res), "foreign_files_touched": len(touched), "touched": touched[:10],
            "error": first_error(res["out"])}


def foreign_cases(work: Path, smoke: bool) -> list[dict]:
    """--output an unrelated non-empty folder, a folder with another tool's state.json and .lock, `/`,
    the home folder."""
    job_file = work / "job.yaml"
    unrelated = work / "foreign" / "unrelated"
    for rel, text in {"notes.txt": "mine\n", "job.json": '{"mine": 1}', "report.md": "# my report\n",
                      "select/manifest.json": "{}", "evaluate/results.json": "{}",
                      "compress/model/config.json": "{}"}.items():
        (unrelated / rel).parent.mkdir(parents=True, exist_ok=True)
        (unrelated / rel).write_text(text)
    cases = [_foreign("output_unrelated_folder", unrelated, job_file)]
    if smoke:
        return cases
    other = work / "foreign" / "other_state"
    other.mkdir(parents=True)
    (other / "state.json").write_text('{"version": 7, "stages": ["select"], "owner": "another tool"}')
    (other / ".lock").write_text("held by another tool\n")
    (other / "data.bin").write_bytes(os.urandom(1024))
    cases.append(_foreign("output_foreign_state_json", other, job_file))
    cases.append(_top_level_case("output_filesystem_root", Path("/"), job_file))
    cases.append(_top_level_case("output_home_folder", Path.home(), job_file))
    return cases


def _top_level_case(name: str, folder: Path, job_file: Path) -> dict:
    """--output `folder` (`/`, the home folder): new entries in it count as touched, and those named
    like a run's outputs are removed afterwards (only the ones this command created)."""
    before = set(os.listdir(folder))
    res = run_cli(["select", job_file, "--output", folder], timeout=300)
    created = sorted(set(os.listdir(folder)) - before)
    for entry in created:
        if entry in OURS:
            p = folder / entry
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return {"case": name, "kind": "foreign_output", "rc": res["rc"], "seconds": res["seconds"],
            "hung": res["hung"], "refused_cleanly": clean_refusal(res), "foreign_files_touched": len(created),
            "touched": created[:10], "error": first_error(res["out"])}


def run_all(work: Path, job: dict, ref: Path, smoke: bool = False) -> list[dict]:
    return stale_cases(work, job, ref, smoke) + foreign_cases(work, smoke)

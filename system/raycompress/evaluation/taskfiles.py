"""The task registry defined by files: task YAMLs found in folders, looked up by name or group.

A task file holds one `TaskConfig` (see config.py); `include: other.yaml` merges another file's
fields first (the including file wins), so a family of tasks shares one template. Files whose name
starts with "_" are templates, not tasks. A job's `evaluate.tasks` entry is a task name, a group
name (every task of that group), a path to a task YAML, a mapping `{name: ..., <field>: ...}`
overriding a task file's fields, or a whole inline task.

Task folders and files are locations (local paths or URIs, see `storage.uri`): a task folder in
object storage is listed with `uri.glob`, and an `include` resolves against the including file's
folder, as do its data paths (`path`, `fewshot_path`). The shipped tasks (the project's
`jobs/tasks`, see `builtin_task_dir`) are searched after the job's `task_dirs`. Messages name
locations without their URI query (`uri.display`), which may hold keys.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath

import yaml
from pydantic import PrivateAttr, ValidationError

from raycompress.config import JobConfig, TaskConfig, TaskOverride
from raycompress.storage import uri


class TaskError(ValueError):
    """A task file or reference that cannot be used; the message names the file and the field."""


class LoadedTask(TaskConfig):
    """A task as resolved: its fields, and the task files they were read from (the file, then each
    include it pulled in, in order; none for a task written inline in a job), for `task_digest`."""

    _sources: tuple[str, ...] = PrivateAttr(default=())


def sibling(location: str, ref: str) -> str:
    """`ref` (a relative path, an absolute path or a URI) resolved against the folder of the file
    at `location`; a URI keeps its query, and "." / ".." parts are folded."""
    if uri.is_uri(ref) or (not uri.is_uri(location) and os.path.isabs(os.path.expanduser(ref))):
        return ref
    if not uri.is_uri(location):
        return os.path.normpath(os.path.join(os.path.dirname(location), ref))
    head, _, query = location.partition("?")
    scheme, _, rest = head.partition("://")
    bucket, _, key = rest.partition("/")
    folded = posixpath.normpath(posixpath.join(posixpath.dirname("/" + key), ref)).lstrip("/")
    return f"{scheme}://{bucket}/{folded}" + (f"?{query}" if query else "")


def _inside(location: str, roots: tuple[str, ...]) -> bool:
    """Whether a task file may name `location`: a URI always (an object the job's credentials
    reach, named explicitly), a local path only inside one of the local folders `roots` (symlinks
    and ".." resolved), so that no task file makes a node read its own files (`/etc/passwd`,
    `~/.aws/credentials`, Ray's token)."""
    if uri.is_uri(location):
        return True
    real = os.path.realpath(location)
    return any(real.startswith(os.path.realpath(r).rstrip(os.sep) + os.sep) for r in roots if not uri.is_uri(r))


def _read_yaml(location: str, seen: tuple[str, ...] = (), roots: tuple[str, ...] = ()) -> tuple[dict, tuple[str, ...]]:
    """A task file's fields with its `include` chain merged in (the including file wins), and the
    files read: `location`, then its includes in order.

    Every path the file names (`include`, `path`, `fewshot_path`) must lie inside `roots` (default:
    the file's own folder): a task file is data from anyone, and may not make us read
    `/etc/passwd` or `../../secrets`. A job names other data through a task override's `path`.

    Raises:
        TaskError: the file cannot be read or parsed, is not a mapping, its include chain is
            missing a file or loops, or a path leaves the allowed folders (naming file and field).
    """
    roots = roots or (os.path.dirname(location) if not uri.is_uri(location) else location.rsplit("/", 1)[0],)
    where = uri.display(location)
    if location in seen:
        chain = " -> ".join(uri.display(s) for s in seen + (location,))
        raise TaskError(f"{where}: field 'include': include cycle {chain}")
    try:
        raw = yaml.safe_load(uri.read_text(location))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TaskError(f"{where}: cannot read task file: {exc}") from exc
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: expected a mapping of task fields, got {type(raw).__name__}")
    for key in ("path", "fewshot_path", "include"):  # a file's paths are relative to that file's folder
        if isinstance(raw.get(key), str):
            raw[key] = sibling(location, raw[key])
            if not _inside(raw[key], roots):
                raise TaskError(f"{where}: field '{key}': {uri.display(raw[key])} is outside the task folders "
                                f"{[uri.display(r) for r in roots]}; a job can point a task at other data with "
                                "an override's `path`")
    inc = raw.pop("include", None)
    if inc is None:
        return raw, (location,)
    if not uri.is_file(inc):
        raise TaskError(f"{where}: field 'include': {uri.display(inc)} not found")
    base, files = _read_yaml(inc, seen + (location,), roots)
    return {**base, **raw}, (location, *files)


def validate_task(raw: dict, where: str, sources: tuple[str, ...] = ()) -> LoadedTask:
    """`raw` as a task, checked against the registered readers, filters and metrics; `sources`: the
    task files it was read from (see `LoadedTask`).

    Raises:
        TaskError: naming `where` (a file, or a job field) and each wrong field.
    """
    from raycompress.evaluation.formats import READERS, TEXT_FILTERS
    from raycompress.evaluation.metrics import METRICS

    try:
        task = LoadedTask.model_validate(raw)
    except ValidationError as exc:
        fields = [f"field '{'.'.join(map(str, e['loc'])) or '<top>'}': {e['msg']}" for e in exc.errors()]
        raise TaskError(f"{where}: invalid task\n  " + "\n  ".join(fields)) from exc
    problems = []
    if task.format not in READERS:
        problems.append(f"field 'format': unknown reader '{task.format}'; known: {READERS.names()}")
    if task.detokenize and task.detokenize not in TEXT_FILTERS:
        problems.append(f"field 'detokenize': unknown filter '{task.detokenize}'; known: {TEXT_FILTERS.names()}")
    for m in task.metrics:
        if m not in METRICS or METRICS.get(m).kind != task.kind:
            known = [n for n in METRICS.names() if METRICS.get(n).kind == task.kind]
            problems.append(f"field 'metrics': '{m}' is not a {task.kind} metric; known: {known}")
    if problems:
        raise TaskError(f"{where}: invalid task\n  " + "\n  ".join(problems))
    task._sources = tuple(sources)
    return task


def _stem(location: str) -> str:
    name = uri.name(location)
    return name.rsplit(".", 1)[0] if "." in name else name


def load_task_file(location: str | os.PathLike, roots: tuple[str, ...] = ()) -> TaskConfig:
    """Read and validate one task YAML at a location (local path or URI); a task without `name`
    is named after the file. Its paths must lie in `roots` (default: its own folder).

    Raises:
        TaskError: naming the file and the field.
    """
    location = str(location)
    raw, files = _read_yaml(location, roots=roots)
    raw.setdefault("name", _stem(location))
    return validate_task(raw, uri.display(location), files)


def index_task_files(dirs: list[str | os.PathLike], roots: tuple[str, ...] = ()) -> dict[str, tuple[str, TaskConfig]]:
    """Every task in `dirs` (folders or folder URIs, searched recursively; "_*.yaml" skipped;
    a folder that does not exist holds none) by name, as (location, task). The tasks' paths must
    lie in `roots` (default: the folders searched).

    Raises:
        TaskError: two files define the same task name, or a file does not validate.
    """
    index: dict[str, tuple[str, TaskConfig]] = {}
    roots = roots or tuple(map(str, dirs))
    for d in map(str, dirs):
        for location in uri.glob("**/*.y*ml", d):
            name = uri.name(location)
            if name.startswith("_") or not name.endswith((".yaml", ".yml")):
                continue
            task = load_task_file(location, roots)
            if task.name in index:
                raise TaskError(f"{uri.display(location)}: field 'name': task '{task.name}' is also defined in "
                                f"{uri.display(index[task.name][0])}")
            index[task.name] = (location, task)
    return index


def _override(task: LoadedTask, over: TaskOverride, where: str) -> LoadedTask:
    update = over.model_dump(exclude_none=True, exclude={"name"})
    return validate_task({**task.model_dump(), **update}, where, task_sources(task)) if update else task


def _by_name(name: str, index: dict, where: str) -> list[TaskConfig]:
    if name in index:
        return [index[name][1]]
    group = [t for _, t in index.values() if t.group == name]
    if not group:
        raise TaskError(f"{where}: no task or group named '{name}' in the task folders; "
                        f"known tasks: {sorted(index)[:12]}{' ...' if len(index) > 12 else ''}, "
                        f"groups: {sorted({t.group for _, t in index.values() if t.group})}")
    return sorted(group, key=lambda t: t.name)


def builtin_task_dir() -> str | None:
    """The shipped task folder: $RAYCOMPRESS_HOME/jobs/tasks (set in the image), else the
    project's jobs/tasks beside the package (a source checkout or editable install), else
    ./jobs/tasks (a Ray job's working directory holding the project); None if none exists."""
    from pathlib import Path

    roots = [os.environ.get("RAYCOMPRESS_HOME"), Path(__file__).resolve().parents[3], Path.cwd()]
    for root in filter(None, roots):
        d = Path(root) / "jobs" / "tasks"
        if d.is_dir():
            return str(d)
    return None


def resolve_tasks(job: JobConfig) -> list[TaskConfig]:
    """The job's `evaluate.tasks` as a flat list of validated tasks (groups expanded, overrides
    applied to each member), in the order written.

    Raises:
        TaskError: naming the job field (evaluate.tasks[i]) or the task file and field.
    """
    dirs = [job.resolve(d) for d in job.evaluate.task_dirs]
    builtin = builtin_task_dir()
    project = (os.path.dirname(os.path.dirname(builtin)),) if builtin else ()  # jobs/tasks -> the project, with data/
    # a task file may name data under the job's folder, its task folder, or the shipped project's data
    roots = (job.base_dir, *dirs, *project)
    index = index_task_files(dirs, roots)
    if builtin and builtin not in dirs:
        for name, entry in index_task_files([builtin], project).items():
            index.setdefault(name, entry)  # the job's own folders win over a shipped task of that name
    out: list[TaskConfig] = []
    for i, entry in enumerate(job.evaluate.tasks):
        where = f"evaluate.tasks[{i}]"
        if isinstance(entry, TaskConfig):
            out.append(validate_task(entry.model_dump(), where))
        elif isinstance(entry, str) and uri.display(entry).endswith((".yaml", ".yml")):
            loc = job.resolve(entry)
            out.append(load_task_file(loc, (*roots, os.path.dirname(loc) if not uri.is_uri(loc) else loc.rsplit("/", 1)[0])))
        elif isinstance(entry, str):
            out.extend(_by_name(entry, index, where))
        else:
            out.extend(_override(t, entry, f"{where} ({entry.name})") for t in _by_name(entry.name, index, where))
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"evaluate.tasks: tasks listed more than once: {dup}")
    return out


def task_sources(task: TaskConfig) -> tuple[str, ...]:
    """The task files `task` was read from: its file, then each include in order (locations);
    () for a task written inline in a job, or a TaskConfig not made by this module."""
    return task._sources if isinstance(task, LoadedTask) else ()


def task_digest(task: TaskConfig, resolve, file_digest=None) -> str:
    """SHA-256 (hex) of everything a task's scores depend on: its fields (data paths aside), the
    task files it was read from (the file and every include, by content) and its data files
    (`path`, and `fewshot_path` when `num_fewshot` > 0) by content, each streamed with
    `storage.uri.sha256`. Same contents, same digest, wherever the files lie; an edited template,
    include or data file changes it.

    Args:
        resolve: maps a data path from the task to a location (`JobConfig.resolve`).
        file_digest: location -> hex SHA-256 of its bytes (the stage guard passes its node's
            cached `NodeCache.digest`); default: `storage.uri.sha256`, read every time.
    Raises:
        TaskError: a file cannot be read (naming the task, the field and the location).
    """
    h = hashlib.sha256(json.dumps(task.model_dump(mode="json", exclude={"path", "fewshot_path"}),
                                  sort_keys=True).encode())
    files = [("task file", loc) for loc in task_sources(task)] + [("path", str(resolve(task.path)))]
    if task.num_fewshot:
        files.append(("fewshot_path", str(resolve(task.fewshot_path))))
    for field, location in files:
        try:
            digest = file_digest(location) if file_digest else uri.sha256(location)[0]
        except OSError as exc:
            raise TaskError(f"task '{task.name}': {field}: cannot read {uri.display(location)}: "
                            f"{type(exc).__name__}: {exc}") from exc
        h.update(f"\n{field} {digest}".encode())
    return h.hexdigest()

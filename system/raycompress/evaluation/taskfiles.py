"""The task registry defined by files: task YAMLs found in folders, looked up by name or group.

A task file holds one `TaskConfig` (see config.py); `include: other.yaml` merges another file's
fields first (the including file wins), so a family of tasks shares one template. Files whose name
starts with "_" are templates, not tasks. A job's `evaluate.tasks` entry is a task name, a group
name (every task of that group), a path to a task YAML, a mapping `{name: ..., <field>: ...}`
overriding a task file's fields, or a whole inline task.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from raycompress.config import JobConfig, TaskConfig, TaskOverride


class TaskError(ValueError):
    """A task file or reference that cannot be used; the message names the file and the field."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A task file's fields with its `include` chain merged in (the including file wins)."""
    if path in seen:
        raise TaskError(f"{path}: field 'include': include cycle {' -> '.join(map(str, seen + (path,)))}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TaskError(f"{path}: cannot read task file: {exc}") from exc
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected a mapping of task fields, got {type(raw).__name__}")
    inc = raw.pop("include", None)
    if inc is None:
        return raw
    base = path.parent / str(inc)
    if not base.is_file():
        raise TaskError(f"{path}: field 'include': {base} not found")
    return {**_read_yaml(base, seen + (path,)), **raw}


def validate_task(raw: dict, where: str) -> TaskConfig:
    """`raw` as a TaskConfig, checked against the registered readers, filters and metrics.

    Raises:
        TaskError: naming `where` (a file, or a job field) and each wrong field.
    """
    from raycompress.evaluation.formats import READERS, TEXT_FILTERS
    from raycompress.evaluation.metrics import METRICS

    try:
        task = TaskConfig.model_validate(raw)
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
    return task


def load_task_file(path: str | Path) -> TaskConfig:
    """Read and validate one task YAML (raises TaskError naming the file and field)."""
    path = Path(path)
    raw = _read_yaml(path)
    raw.setdefault("name", path.stem)
    return validate_task(raw, str(path))


def index_task_files(dirs: list[Path]) -> dict[str, tuple[Path, TaskConfig]]:
    """Every task in `dirs` (searched recursively, "_*.yaml" skipped) by name.

    Raises:
        TaskError: two files define the same task name, or a file does not validate.
    """
    index: dict[str, tuple[Path, TaskConfig]] = {}
    for d in dirs:
        for path in sorted(d.rglob("*.y*ml")) if d.is_dir() else []:
            if path.name.startswith("_") or path.suffix not in (".yaml", ".yml"):
                continue
            task = load_task_file(path)
            if task.name in index:
                raise TaskError(f"{path}: field 'name': task '{task.name}' is also defined in {index[task.name][0]}")
            index[task.name] = (path, task)
    return index


def _override(task: TaskConfig, over: TaskOverride, where: str) -> TaskConfig:
    update = over.model_dump(exclude_none=True, exclude={"name"})
    return validate_task({**task.model_dump(), **update}, where) if update else task


def _by_name(name: str, index: dict, where: str) -> list[TaskConfig]:
    if name in index:
        return [index[name][1]]
    group = [t for _, t in index.values() if t.group == name]
    if not group:
        raise TaskError(f"{where}: no task or group named '{name}' in the task folders; "
                        f"known tasks: {sorted(index)[:12]}{' ...' if len(index) > 12 else ''}, "
                        f"groups: {sorted({t.group for _, t in index.values() if t.group})}")
    return sorted(group, key=lambda t: t.name)


def resolve_tasks(job: JobConfig) -> list[TaskConfig]:
    """The job's `evaluate.tasks` as a flat list of validated tasks (groups expanded, overrides
    applied to each member), in the order written.

    Raises:
        TaskError: naming the job field (evaluate.tasks[i]) or the task file and field.
    """
    index = index_task_files([job.resolve(d) for d in job.evaluate.task_dirs])
    out: list[TaskConfig] = []
    for i, entry in enumerate(job.evaluate.tasks):
        where = f"evaluate.tasks[{i}]"
        if isinstance(entry, TaskConfig):
            out.append(validate_task(entry.model_dump(), where))
        elif isinstance(entry, str) and entry.endswith((".yaml", ".yml")):
            out.append(load_task_file(job.resolve(entry)))
        elif isinstance(entry, str):
            out.extend(_by_name(entry, index, where))
        else:
            out.extend(_override(t, entry, f"{where} ({entry.name})") for t in _by_name(entry.name, index, where))
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"evaluate.tasks: tasks listed more than once: {dup}")
    return out

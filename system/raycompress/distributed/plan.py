"""`raycompress run --dry-run`: a job's plan without running it, checked against the cluster.

The plan: the stages in order, the model's sizes (parameters, decoder layers, bytes on storage),
the calibration set's size, the analytic memory floor of each compression actor and the bytes it
moves per decoder layer (`engine.budget.layer_floors`, from the model's config and the checkpoint
header alone), the optional train stage's memory per worker for its strategy (DDP / ZeRO-2 / ZeRO-3,
offload; `training.memory`), and the resources each stage asks Ray for. `check_fits` compares
those requests with what the cluster offers (total and per node, GPU memory per worker) and names
every request it cannot give.

`preflight` runs before Ray starts, on every run: everything the job names that can be checked
without data (selection method, algorithm, targets, per-layer sparsity count, group sizes against
the model's input widths, the architecture, evaluation tasks and their files) is checked, so a
wrong value fails in seconds with the field's name, not after hours of selection and compression.
"""
from __future__ import annotations

from raycompress.config import JobConfig
from raycompress.models.fetch import ModelRef

GIB = 2**30


class PreflightError(ValueError):
    """A job that would fail later; the message names the job field and what would be right."""


def _check_sources(job: JobConfig) -> None:
    """Every corpus source the select stage will read matches at least one file (a listing, no reads)."""
    from raycompress.data.readers import CorpusPathError, expand_paths

    for name, src in sorted(job.select.sources.items()):
        try:
            expand_paths(src.path, job.base_dir)
        except (CorpusPathError, OSError) as exc:
            raise PreflightError(f"select.sources.{name}.path: {exc}") from exc


def preflight(job: JobConfig, model: ModelRef):
    """Check what the job names against the registries, the model's config and the task files.
    Returns the model's `OffloadedModel` (config and weight map only, no weights).

    Raises:
        PreflightError: naming the field (select.sources.<name>.path, select.method,
            compress.algorithm, compress.targets, compress.sparsity, compress.quant.group_size,
            model, evaluate.tasks).
    """
    from raycompress.engine.pipeline import Plan
    from raycompress.evaluation.taskfiles import TaskError, resolve_tasks
    from raycompress.evaluation.tasks import check_templates
    from raycompress.models.weights import OffloadedModel
    from raycompress.registry import ALGORITHMS, SELECTORS

    _check_sources(job)
    c = job.compress
    for field, name, reg in (("select.method", job.select.method, SELECTORS), ("compress.algorithm", c.algorithm, ALGORITHMS)):
        if name not in reg:
            raise PreflightError(f"{field}: unknown {reg.kind} '{name}'; known: {reg.names()}")
    try:
        om = OffloadedModel(model)  # config.json refused if it asks for remote code or names no supported model
        om.check_files()  # every weight file's safetensors header against its size (no tensor data)
    except (OSError, ValueError, KeyError) as exc:
        raise PreflightError(f"model: {exc}") from exc
    try:
        plan = Plan(om, c, job.ray.compress_actors)
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    if isinstance(c.sparsity, list) and len(c.sparsity) != om.num_layers:
        raise PreflightError(f"compress.sparsity: {len(c.sparsity)} values for the model's {om.num_layers} decoder layers")
    if c.quant is not None and c.quant.group_size:
        bad = sorted({d_in for _, d_in in plan.shapes.values() if d_in % c.quant.group_size})
        if bad:
            raise PreflightError(f"compress.quant.group_size: {c.quant.group_size} does not divide the input width "
                                 f"{bad} of some target linears; use a divisor of {bad[0]} (e.g. 32, 64, 128)")
    try:
        tasks = resolve_tasks(job)
    except TaskError as exc:
        raise PreflightError(f"evaluate.tasks: {exc}") from exc
    from raycompress.storage import uri

    for t in tasks:
        for field, loc in (("path", t.path), ("fewshot_path", t.fewshot_path if t.num_fewshot else None)):
            if loc and not uri.is_file(job.resolve(loc)):
                raise PreflightError(f"evaluate.tasks: task '{t.name}': field '{field}': "
                                     f"{uri.display(job.resolve(loc))} not found")
        try:
            check_templates(t, job.resolve)
        except (TaskError, ValueError) as exc:
            raise PreflightError(f"evaluate.tasks: {exc}") from exc
    return om


def _split(n: int, k: int) -> list[int]:
    """`n` calibration rows over `k` actors, as the compress stage shards them."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def build_plan(job: JobConfig, model: ModelRef, cluster_gpus: float, om=None) -> dict:
    """The plan as a dict (see module docstring). `cluster_gpus`: GPUs the cluster has, which
    decides `gpus_per_actor: auto`; `om`: the model's `OffloadedModel` if already built.

    Raises:
        FileNotFoundError, ValueError: the model cannot be read or its architecture is not in the
            table; evaluate.tasks names a task that does not exist (TaskError).
    """
    from raycompress.distributed.resources import gpus_per_actor
    from raycompress.engine.budget import layer_floors
    from raycompress.engine.pipeline import Plan
    from raycompress.evaluation.taskfiles import resolve_tasks
    from raycompress.models.weights import OffloadedModel
    from raycompress.storage import uri

    om = om or OffloadedModel(model)  # `preflight`'s, when the caller ran it
    r, c, s = job.ray, job.compress, job.select
    rows = _split(s.n_samples, r.compress_actors)
    plan = Plan(om, c, r.compress_actors)
    n_subsets = len(s.sources) if plan.split else 1
    floors = layer_floors(om, c, plan, rows, s.seq_len, c.micro_batch, n_subsets)
    root = om.model_dir if model.is_alias else model.location
    files = sorted(set(om.weight_map.values()))
    gpus = gpus_per_actor(r, cluster_gpus)
    tasks = [t.name for t in resolve_tasks(job)]
    models = (["dense"] if job.evaluate.include_dense else []) + ["compressed"] + (["recovered"] if job.train else [])
    return {
        "job": job.name,
        "model": {"location": uri.display(model.location), "architecture": om.config.architectures[0],
                  "parameters": sum(p.numel() for p in om.skeleton.parameters()), "decoder_layers": om.num_layers,
                  "dtype": str(om.dtype).removeprefix("torch."),
                  "bytes_on_storage": sum(uri.info(uri.join(str(root), f)).size for f in files)},
        "stages": [
            {"stage": "select", "method": s.method, "sources": sorted(s.sources), "calibration_rows": s.n_samples,
             "seq_len": s.seq_len, "actors": r.select_actors, "cpus_per_actor": r.cpus_per_actor,
             "gpus_per_actor": 0.0},
            {"stage": "compress", "algorithm": c.algorithm, "sparsity": c.sparsity, "targets_per_layer": len(plan.targets),
             "actors": r.compress_actors, "rows_per_actor": rows, "cpus_per_actor": r.cpus_per_actor,
             "gpus_per_actor": gpus,
             "memory_floor_gib_per_actor": [round(m / GIB, 3) for m in floors["memory_bytes_per_worker"]],
             "bytes_moved_per_layer": floors["bytes_moved_per_layer"]},
            *([_train_entry(job.train, om)] if job.train is not None else []),
            {"stage": "evaluate", "tasks": tasks, "models": models, "actors": r.eval_actors,
             "cpus_per_actor": r.cpus_per_actor, "gpus_per_actor": gpus},
            {"stage": "report"},
        ],
    }


def _train_entry(t, om) -> dict:
    """The train stage's plan entry: its Ray Train workers and the memory estimate per worker
    (`training.memory.train_memory` over `om`'s skeleton config, in GiB per component).

    Raises:
        ValueError: the model's config lacks a field the estimate needs (named).
    """
    from raycompress.training.memory import COMPONENTS, train_memory

    est = train_memory(om.config, t, t.num_workers, dtype=str(om.dtype).removeprefix("torch."))
    gib = {k: round(est[k] / GIB, 3) for k in (*COMPONENTS, "total", "device_total", "host_total")}
    return {"stage": "train", "strategy": t.strategy, "zero_stage": t.zero_stage if t.strategy == "deepspeed" else None,
            "offload": t.offload, "activation_checkpointing": t.activation_checkpointing,
            "batch_size": t.batch_size, "seq_len": t.seq_len, "num_workers": t.num_workers,
            "cpus_per_worker": t.cpus_per_worker, "gpus_per_worker": t.gpus_per_worker,
            "memory_gib_per_worker": gib, "memory_estimate": est}


_FIELDS = {"select": ("actors", "ray.select_actors", "ray.cpus_per_actor"),
           "compress": ("actors", "ray.compress_actors", "ray.cpus_per_actor"),
           "evaluate": ("actors", "ray.eval_actors", "ray.cpus_per_actor"),
           "train": ("workers", "train.num_workers", "train.cpus_per_worker")}


def _request(st: dict) -> tuple[float, float, float] | None:
    """(count, CPUs each, GPUs each) of a stage's actors or Ray Train workers; None: it asks for none."""
    if "actors" in st:
        return st["actors"], st["cpus_per_actor"], st["gpus_per_actor"]
    if "num_workers" in st:
        return st["num_workers"], st["cpus_per_worker"], st["gpus_per_worker"]
    return None


def _train_memory_problems(st: dict, nodes: list[dict], gpu_memory_gib: float) -> list[str]:
    """The train estimate against one worker's memory: a GPU worker's device is its share of the
    smallest GPU (`accelerator_memory_bytes` per GPU where a node dict has it, else
    `gpu_memory_gib`) and its host share the node's RAM over the workers the node holds; a CPU
    worker's device is the largest node's RAM (bytes)."""
    from raycompress.training.memory import check_train_fits

    est, gpu = st["memory_estimate"], st["gpus_per_worker"]
    if gpu == 0:
        biggest = max((n.get("memory", 0.0) for n in nodes), default=0.0)
        return check_train_fits(est, biggest, None)
    gpu_nodes = [n for n in nodes if n.get("GPU", 0.0) >= gpu] or [{}]
    per_gpu = min(n.get("accelerator_memory_bytes", gpu_memory_gib * GIB) for n in gpu_nodes)
    shares = [n["memory"] / max(1.0, n.get("GPU", 0.0) // gpu) for n in gpu_nodes if "memory" in n]
    return check_train_fits(est, per_gpu * gpu, min(shares) if shares else None)


def check_fits(plan: dict, nodes: list[dict], gpu_memory_gib: float = 80.0) -> list[str]:
    """Every request of `plan` the cluster cannot give; empty when it fits.

    `nodes`: the alive nodes' resources (`ray.nodes()[i]["Resources"]`: CPU, GPU, memory in bytes;
    optionally "accelerator_memory_bytes", bytes per GPU, which Ray does not report by itself).
    Stages run one after another, so each stage's actors (train: Ray Train workers) must fit
    together, each on some node; a CPU compression actor's memory floor must fit one node's memory;
    the train estimate must fit one worker's GPU (`gpu_memory_gib` GiB where a node gives no
    accelerator_memory_bytes) and its host share, or a CPU worker the largest node's memory.
    """
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    problems = []
    for st in plan["stages"]:
        req = _request(st)
        if req is None:
            continue
        name, (k, cpu, gpu) = st["stage"], req
        noun, count_field, cpu_field = _FIELDS[name]
        if k * cpu > total["CPU"]:
            problems.append(f"{name}: {k} {noun} x {cpu} CPU = {k * cpu:g} CPU, the cluster has {total['CPU']:g} "
                            f"(lower {count_field} or {cpu_field})")
        if k * gpu > total["GPU"]:
            problems.append(f"{name}: {k} {noun} x {gpu:g} GPU = {k * gpu:g} GPU, the cluster has {total['GPU']:g}")
        if not any(n.get("CPU", 0.0) >= cpu and n.get("GPU", 0.0) >= gpu for n in nodes):
            problems.append(f"{name}: no node offers {cpu:g} CPU and {gpu:g} GPU for one {noun[:-1]}")
        floors = st.get("memory_floor_gib_per_actor")
        if floors and gpu == 0:
            biggest = max((n.get("memory", 0.0) for n in nodes), default=0.0) / GIB
            if max(floors) > biggest:
                problems.append(f"{name}: an actor needs at least {max(floors):.2f} GiB, the largest node offers "
                                f"{biggest:.2f} GiB (add compress actors or nodes, or use GPUs)")
        if "memory_estimate" in st:
            problems += _train_memory_problems(st, nodes, gpu_memory_gib)
    return problems


def _count(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1000:
            return f"{n:.3g} {unit}" if unit else f"{n:g} "
        n /= 1000
    return f"{n:.3g} P"


def format_plan(plan: dict, problems: list[str]) -> str:
    """The plan as lines a person reads."""
    m = plan["model"]
    lines = [f"job {plan['job']}: model {m['location']} ({m['architecture']}, {_count(m['parameters'])} parameters, "
             f"{m['decoder_layers']} decoder layers, {m['dtype']}, {m['bytes_on_storage'] / GIB:.1f} GiB on storage)"]
    for st in plan["stages"]:
        facts = ", ".join(f"{k}={v}" for k, v in st.items() if k not in ("stage", "memory_estimate"))
        lines.append(f"  {st['stage']}: {facts or 'writes report.md / .html / .json'}")
    lines += [f"  cannot run: {p}" for p in problems] or ["  the cluster can give every stage what it asks"]
    return "\n".join(lines)

"""`raycompress run --dry-run`: a job's plan without running it, checked against the cluster.

The plan: the stages in order, the model's sizes (parameters, decoder layers, bytes on storage),
the calibration set's size, the analytic memory floor of each compression actor and the bytes it
moves per decoder layer (`engine.budget.layer_floors`, from the model's config and the checkpoint
header alone), the optional train stage's memory per worker for its strategy (DDP / ZeRO-2 / ZeRO-3,
offload; `training.memory`), and the resources each stage asks Ray for. `check_fits` compares
those requests with what the cluster offers (total and per node, GPU memory per worker) and names
every request it cannot give; `run` makes the same check once Ray is up (`require_resources`),
before any stage, so a request the cluster cannot give is refused rather than waited on forever.

`preflight` runs before Ray starts, on every run: everything the job names that can be checked
without data (selection method, algorithm, targets, per-layer sparsity count, group sizes against
the model's input widths, the architecture, evaluation tasks and their files, seq_len against the
model's positions, the calibration set's tokens against the corpora's file sizes) is checked, so a
wrong value fails in seconds with the field's name, not after hours of selection and compression.
"""
from __future__ import annotations

import logging

from raycompress.config import JobConfig
from raycompress.models.fetch import ModelRef

log = logging.getLogger(__name__)
GIB = 2**30


class PreflightError(ValueError):
    """A job that would fail later; the message names the job field and what would be right."""


def _check_sources(job: JobConfig) -> dict[str, list[str]]:
    """Every corpus source the select stage will read matches at least one file (a listing, no
    reads). Returns source name -> its file locations."""
    from raycompress.data.readers import CorpusPathError, expand_paths

    found = {}
    for name, src in sorted(job.select.sources.items()):
        try:
            found[name] = list(expand_paths(src.path, job.base_dir))
        except (CorpusPathError, OSError) as exc:
            raise PreflightError(f"select.sources.{name}.path: {exc}") from exc
    return found


def corpus_token_bound(job: JobConfig, files: dict[str, list[str]]) -> int | None:
    """An upper bound on the tokens the select stage can pack from `files` (source -> locations),
    from file sizes alone (no reads); None when some file's size bounds nothing (compressed:
    .gz/.zst/.bz2, or Parquet, whose columns are compressed).

    The bound: tokens <= bytes + 2 per file. A document's tokens cover at least one byte of its
    UTF-8 text each, except at most two per document (a tokenizer's leading-space marker and the
    separator `data.tokenize.pack` appends); a JSONL record spends at least 9 bytes on syntax
    besides its text and a `text_blocks` block is followed by a blank line (2 bytes) except the
    last, and a `text` file is one document, so those two tokens are paid for by bytes that hold no
    text, except once per file.
    """
    from ray.data._internal.util import infer_compression  # the reader's own rule (readers.CorpusDatasource)

    from raycompress.data.records import CorpusPathError, infer_format
    from raycompress.storage import uri

    total = 0
    for name, locations in files.items():
        declared = job.select.sources[name].format
        for loc in locations:
            inner = uri.resolve(loc)[1]  # the path without a URI's scheme and query
            try:
                fmt = infer_format(inner) if declared == "auto" else declared
            except CorpusPathError:
                return None  # the reader decides what such a file is
            if fmt == "parquet" or infer_compression(inner) is not None:
                return None
            total += uri.info(loc).size + 2
    return total


def _check_sizes(job: JobConfig, om, files: dict[str, list[str]]) -> None:
    """select.seq_len against the model's positions; the calibration set against the corpora."""
    s = job.select
    max_pos = getattr(om.config, "max_position_embeddings", None)
    if max_pos is not None and s.seq_len > max_pos:
        raise PreflightError(f"select.seq_len: {s.seq_len} tokens is more than the model's max_position_embeddings "
                             f"{max_pos} (its config.json); use at most {max_pos}")
    bound = corpus_token_bound(job, files)
    need = s.n_samples * s.seq_len
    if bound is not None and need > bound:
        n_files = sum(len(v) for v in files.values())
        raise PreflightError(f"select.n_samples x select.seq_len: {s.n_samples} x {s.seq_len} = {need} tokens, but "
                             f"the {n_files} corpus files of select.sources ({bound - 2 * n_files} bytes) hold at "
                             f"most {bound} tokens (one per byte, plus 2 per file); lower n_samples or seq_len, "
                             f"or add corpus files")


def _check_scheme(c, plan, om) -> None:
    """The recipe's quantization scheme against the model: group size dividing every target's
    d_in (NVFP4: 16), float8 dtypes in this torch for float formats, a norm-fed group for smoothing.

    Raises:
        PreflightError: naming the field and the first module that cannot take it.
    """
    import torch

    scheme = plan.scheme
    if scheme is None:
        return
    field = "compress.quant.group_size" if c.quant is not None else f"compress.scheme ({scheme.name})"
    g = scheme.weight_spec.group_size
    for t in plan.targets:
        d_in = plan.shapes[t][1]
        if g and d_in % g:
            raise PreflightError(f"{field}: group size {g} does not divide d_in={d_in} of module {t} "
                                 f"(decoder layer linears {om.layer_prefix(0)}.*); use a divisor of {d_in}")
    acts = scheme.activations
    floats = scheme.weight_spec.type != "int" or scheme.kv is not None or (acts is not None and str(acts.type) != "int"
                                                                        and "INT" not in str(acts.type).upper())
    if floats and not hasattr(torch, "float8_e4m3fn"):
        raise PreflightError(f"{field}: needs float8 dtypes (torch.float8_e4m3fn), which torch {torch.__version__} lacks")
    if (c.smoothquant is not None or c.algorithm == "awq") and not set(plan.groups) & set(dict(om.spec.norm_before)):
        raise PreflightError(f"compress.{'smoothquant' if c.smoothquant else 'algorithm'}: no target input group of "
                             f"{om.config.architectures} is fed by a norm (targets {plan.targets}); nothing to smooth")


def _check_moe(job: JobConfig, om) -> None:
    """A mixture of experts' low-token policy (`compress.moe`) against the calibration budget, and
    its routing fields against the config. The router sends N·k routed tokens over E experts
    (N = select.n_samples x select.seq_len tokens, k = num_experts_per_tok), so the least-fed expert
    gets at most ⌊N·k/E⌋: policy refuse with a larger min_tokens_per_expert must fail; no expert
    can receive more than N tokens, so any policy with min_tokens_per_expert > N cannot be met
    (all_tokens gives every expert N; fallback would fall back on every expert).
    Smoothing (SmoothQuant, AWQ's scales) applies where the table row names a norm before a group:
    on MoE rows the attention input only (the norm before the block also feeds the router).

    Raises:
        PreflightError: naming the field and the module.
    """
    from raycompress.models.moe import num_experts

    spec, c, s = om.spec, job.compress, job.select
    if spec.moe is None:
        return
    module = f"{om.layer_prefix(0).rsplit('.', 1)[0]}.*.{spec.moe.path(spec.moe.experts)}"
    e, k = num_experts(om.config, spec), int(getattr(om.config, spec.moe.top_k_key, 0) or 0)
    if not 0 < k <= e:
        raise PreflightError(f"model: config.json {spec.moe.top_k_key}={k} must be in [1, {spec.moe.num_experts_key}="
                             f"{e}] (module {module})")
    min_tok, policy = (c.moe.min_tokens_per_expert, c.moe.policy) if c.moe is not None else (1, "fallback")
    n = s.n_samples * s.seq_len
    if min_tok > n:
        raise PreflightError(f"compress.moe.min_tokens_per_expert: {min_tok} tokens per expert of module {module}, "
                             f"but the calibration set has {n} tokens (select.n_samples x select.seq_len); no expert "
                             f"can receive more (policy {policy})")
    if policy == "refuse" and min_tok * e > n * k:
        raise PreflightError(f"compress.moe.min_tokens_per_expert: {min_tok} routed tokens for each of the {e} experts "
                             f"of module {module} needs at least {-(-min_tok * e // k)} calibration tokens ({e} x "
                             f"{min_tok} / {spec.moe.top_k_key}={k}); select.n_samples x select.seq_len = {n}: policy "
                             "refuse would stop; raise the budget, lower the threshold, or use all_tokens / fallback")


def preflight(job: JobConfig, model: ModelRef):
    """Check what the job names against the registries, the model's config and the task files.
    Returns the model's `OffloadedModel` (config and weight map only, no weights).

    Raises:
        PreflightError: naming the field (select.sources.<name>.path, select.method, select.seq_len,
            select.n_samples x select.seq_len, compress.algorithm, compress.targets, compress.sparsity,
            compress.cus_prun.dimensions, compress.quant.group_size, compress.scheme,
            compress.moe.min_tokens_per_expert, compress.owl on MoE layers, model, evaluate.tasks).
    """
    from raycompress.engine.pipeline import Plan, layer_kinds
    from raycompress.engine.subsets import row_subsets
    from raycompress.evaluation.taskfiles import TaskError, resolve_tasks
    from raycompress.evaluation.tasks import check_templates
    from raycompress.models.weights import OffloadedModel
    from raycompress.registry import ALGORITHMS, SELECTORS

    files = _check_sources(job)
    c = job.compress
    for field, name, reg in (("select.method", job.select.method, SELECTORS), ("compress.algorithm", c.algorithm, ALGORITHMS)):
        if name not in reg:
            raise PreflightError(f"{field}: unknown {reg.kind} '{name}'; known: {reg.names()}")
    try:
        om = OffloadedModel(model)  # config.json refused if it asks for remote code or names no supported model
        om.check_files()  # every weight file's safetensors header against its size (no tensor data)
    except (OSError, ValueError, KeyError) as exc:
        raise PreflightError(f"model: {exc}") from exc
    _check_sizes(job, om, files)
    if "router" in SELECTORS.get(job.select.method).needs and om.spec.moe is None:
        raise PreflightError(f"select.method: '{job.select.method}' probes the model's expert routers, and "
                             f"{om.config.architectures} is not a mixture of experts; use zipcal")
    try:
        plans = [Plan(om, c, job.ray.compress_actors, i) for i in layer_kinds(om)]  # MoE: sparse and dense layers
        row_subsets(c, sorted(job.select.sources))  # a Cus-Prun dimension no source feeds
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    if isinstance(c.sparsity, list) and len(c.sparsity) != om.num_layers:
        raise PreflightError(f"compress.sparsity: {len(c.sparsity)} values for the model's {om.num_layers} decoder layers")
    for plan in plans:
        _check_scheme(c, plan, om)
    _check_moe(job, om)
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


def build_plan(job: JobConfig, model: ModelRef, cluster_gpus: float, om=None) -> dict:
    """The plan as a dict (see module docstring). `cluster_gpus`: GPUs the cluster has, which
    decides `gpus_per_actor: auto`; `om`: the model's `OffloadedModel` if already built.

    Raises:
        FileNotFoundError, ValueError: the model cannot be read or its architecture is not in the
            table; evaluate.tasks names a task that does not exist (TaskError).
    """
    from raycompress.distributed.resources import gpus_per_actor
    from raycompress.engine.budget import model_floors
    from raycompress.engine.pipeline import Plan
    from raycompress.engine.subsets import row_subsets
    from raycompress.engine.transfer import shard_calibration
    from raycompress.evaluation.taskfiles import resolve_tasks
    from raycompress.models.weights import OffloadedModel
    from raycompress.storage import uri

    om = om or OffloadedModel(model)  # `preflight`'s, when the caller ran it
    r, c, s = job.ray, job.compress, job.select
    rows = [p.n for p in shard_calibration(s.n_samples, r.compress_actors, c.micro_batch)]
    plan = Plan(om, c, len(rows))
    n_subsets = len(row_subsets(c, sorted(s.sources)))  # as compress counts its masks (rows from every source)
    floors = model_floors(om, c, len(rows), rows, s.seq_len, c.micro_batch, n_subsets)  # largest layer kind
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
             "actors": len(rows), "rows_per_actor": rows, "cpus_per_actor": r.cpus_per_actor,
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


POLL_S = 5.0  # seconds between looks at a cluster that cannot give the job's requests yet


def require_resources(job: JobConfig, model: ModelRef, om=None) -> dict:
    """`run`'s resource check, after Ray starts and before any stage: the dry run's plan
    (`build_plan`) against the alive nodes (`check_fits`). While the cluster cannot give every
    request it is looked at again every `POLL_S` seconds, for up to `ray.resource_wait_s` seconds
    (an autoscaling cluster adding nodes; one log line says what is awaited), then refused.
    `om`: the model's `OffloadedModel` if already built. Returns the plan.

    Raises:
        PreflightError: naming each request the cluster cannot give, and the wait.
    """
    import time

    from raycompress.distributed.resources import cluster_nodes
    from raycompress.models.weights import OffloadedModel

    om = om or OffloadedModel(model)
    wait = job.ray.resource_wait_s
    deadline, told = time.monotonic() + wait, False
    while True:
        nodes = cluster_nodes()
        try:
            plan = build_plan(job, model, sum(n.get("GPU", 0.0) for n in nodes), om)
        except (OSError, ValueError) as exc:
            raise PreflightError(f"plan: {exc}") from exc
        problems = check_fits(plan, nodes)
        if not problems:
            return plan
        if wait > 0 and not told:
            log.warning("the Ray cluster cannot give yet: %s; waiting up to %g s for nodes to join "
                        "(ray.resource_wait_s)", "; ".join(problems), wait)
            told = True
        left = deadline - time.monotonic()
        if left <= 0:
            raise PreflightError(f"the Ray cluster cannot give what the job asks (after waiting {wait:g} s, "
                                 f"ray.resource_wait_s): " + "; ".join(problems))
        time.sleep(min(POLL_S, left))


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

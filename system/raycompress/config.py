"""The job recipe: one typed, validated model per stage, loaded from YAML.

A job file says *what* to do (model, corpora and mix, selection, compression, eval tasks);
the layer pipeline (`engine/`) says *how*, and `RayConfig` says *where*. Every model forbids
unknown fields, so a typo is an error that names the field and the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """A job file that cannot be read or does not validate; the message names file and field."""


class _Strict(BaseModel):
    """Unknown fields are errors, and values are never coerced across types: YAML `true` or `"5"`
    is not a number, anywhere (inside lists and mappings too); an int is a valid float."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, raw):
        """YAML `true` is not a number: pydantic would take it as 1 for an int or float field."""
        if isinstance(raw, dict):
            for name, field in cls.model_fields.items():
                value = raw.get(name)
                if isinstance(value, bool) and bool not in _types(field.annotation) and \
                        _types(field.annotation) & {int, float}:
                    raise ValueError(f"field '{name}': expected a number, got {value!r}")
        return raw


def _types(annotation) -> set:
    """The plain types an annotation allows (int | None -> {int, NoneType})."""
    from typing import get_args

    args = get_args(annotation)
    return {a for a in args if isinstance(a, type)} if args else ({annotation} if isinstance(annotation, type) else set())


class SourceConfig(_Strict):
    """One named corpus: a path, glob or URI (s3://, gs://, file://) of JSONL(.gz/.zst), Parquet or text files."""

    path: str
    format: Literal["auto", "jsonl", "parquet", "text", "text_blocks"] = Field(
        "auto", description="auto: from the extension; text = one document per file, text_blocks = per blank-line block")
    text_field: str = "text"
    max_doc_chars: int = Field(200_000, gt=0, description="documents longer than this are skipped")


class RoutingSelectConfig(_Strict):
    """Routing-aware selection (`method: routing`, mixture-of-experts models; `selection.routing`):
    ZipCal's lexical coverage plus β × the routed-token need it covers, so that every expert the
    corpus reaches gets `min_tokens_per_expert` tokens at the first `probe_layers` routers."""

    min_tokens_per_expert: int = Field(16, ge=0)
    beta: float = Field(16.0, ge=0.0, description="weight of the routed-expert coverage against ZipCal's gain")
    probe_layers: int = Field(2, gt=0, le=1000, description="routers probed (the first k MoE decoder layers)")


class SelectConfig(_Strict):
    """Calibration-set selection (stage 1)."""

    method: str = "zipcal"
    sources: dict[str, SourceConfig]
    mix: dict[str, float] = Field(default_factory=dict, description="source name -> share of n_samples")
    n_samples: int = Field(64, gt=0)
    seq_len: int = Field(512, gt=1, description="tokens per calibration sequence")
    seed: int = 0
    candidate_pool: int = Field(2000, gt=0, description="ZipCal: random candidate pool per greedy step")
    shard_docs: int = Field(4096, gt=0, description="documents per shard (the unit of round-1 selection)")
    dedup: bool = Field(True, description="drop exact duplicate documents (content hash) before selection")
    multi_source: Literal["mix", "kcenter"] = Field(
        "mix", description="mix: each source fills its share; kcenter: each source selects n_samples, "
        "then k-center greedy on sentence embeddings cuts the union to n_samples (ZipCal multi-source)")
    embedder: str = Field("all-minilm-l6-v2", description="kcenter: a sentence-embedding model folder or alias")
    routing: RoutingSelectConfig | None = Field(None, description="method routing: coverage target (defaults apply)")

    @model_validator(mode="after")
    def _check_mix(self) -> "SelectConfig":
        mix = self.mix or {name: 1.0 / len(self.sources) for name in self.sources}
        unknown = sorted(set(mix) - set(self.sources))
        if unknown:
            raise ValueError(f"mix names unknown sources {unknown}; sources are {sorted(self.sources)}")
        if any(v < 0 for v in mix.values()) or abs(sum(mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"mix shares must be >= 0 and sum to 1, got {mix}")
        object.__setattr__(self, "mix", dict(mix))
        return self


class QuantConfig(_Strict):
    """Weight-only integer quantization (GPTQ, or SparseGPT's joint sparse + quantized pass)."""

    bits: Literal[4, 8] = 4
    symmetric: bool = True
    group_size: int | None = Field(128, gt=0, description="columns per scale; null = per output channel")
    act_order: bool = Field(False, description="GPTQ activation order (static groups)")


# Quantization schemes by the compressed-tensors preset names (llm-compressor's); aliases on the right
SCHEMES: dict[str, str] = {
    "W4A16": "W4A16", "W4A16_ASYM": "W4A16_ASYM", "W8A16": "W8A16",
    "W8A8-INT8": "W8A8", "W8A8": "W8A8", "INT8": "W8A8",
    "FP8": "FP8", "FP8_DYNAMIC": "FP8_DYNAMIC", "NVFP4": "NVFP4", "NVFP4A16": "NVFP4A16",
}
WEIGHT_ONLY_INT = ("W4A16", "W4A16_ASYM", "W8A16")  # the schemes AWQ and SparseGPT's joint pass take


class SmoothQuantConfig(_Strict):
    """SmoothQuant (Xiao et al. 2023, eq. 4): per input channel j of an input group that a norm
    feeds, s_j = max|X_j|^α / max|W_j|^(1-α); W's columns are multiplied by s and the norm's weight
    divided by it, before the weights are quantized (the Hessian then sees smoothed inputs)."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength α")


class AWQConfig(_Strict):
    """AWQ (Lin et al. 2024, MLSys; mit-han-lab/llm-awq `auto_scale`): per input group that a norm
    feeds, s = mean|X|^r over a grid of r in [0, 1), the r with the least output error of the
    quantized group kept; weights are then rounded to nearest on the scheme's grid."""

    n_grid: int = Field(20, gt=1, le=1000, description="grid points of the scaling exponent r")


class KVCacheConfig(_Strict):
    """FP8 (E4M3) KV cache: one calibrated scale per decoder layer for keys and one for values
    (max |k| / 448 and max |v| / 448 over the calibration set, after RoPE), written as
    compressed-tensors' `kv_cache_scheme` with `k_scale` / `v_scale`."""

    type: Literal["fp8"] = "fp8"
    strategy: Literal["tensor"] = "tensor"


class MixCalConfig(_Strict):
    """MixCal-style statistics: H = H_domain + λ·H_general (each a per-token mean), same for
    Wanda's norms; rows of the calibration set from `general_sources` feed the general term."""

    general_sources: list[str] = Field(..., min_length=1)
    lam: float = Field(0.25, ge=0.0, description="λ, the weight of the general statistics")


class OWLConfig(_Strict):
    """OWL layer-wise sparsity: layers with more activation outliers are pruned less."""

    lam: float = Field(0.08, gt=0.0, lt=0.5, description="λ: sparsities spread over target ± λ")
    m: float = Field(5.0, gt=0.0, description="a weight is an outlier if its Wanda score > m × the layer mean")


class MoEConfig(_Strict):
    """Mixture-of-experts models: what happens to a routed expert that the calibration set starves
    (`engine.experts`). Tokens are counted as the router sends them (routed tokens per expert)."""

    min_tokens_per_expert: int = Field(1, ge=0, description="routed calibration tokens an expert needs to be "
                                       "solved from its own statistics")
    policy: Literal["all_tokens", "fallback", "refuse"] = Field(
        "fallback", description="all_tokens: every expert's statistics from every calibration token (the output "
        "still follows the router); fallback: below the threshold a data-free method (rtn when quantized, "
        "magnitude when pruning), listed in the records; refuse: stop before solving, naming layer and expert")


class CusPrunConfig(_Strict):
    """Cus-Prun structured FFN-neuron pruning: each named dimension (language, domain, task, ...)
    is scored on the calibration rows of its own sources; a neuron is kept if it is relevant to any
    dimension. `sparsity` is the fraction of FFN neurons removed per decoder layer."""

    dimensions: dict[str, list[str]] = Field(
        ..., min_length=1, description="dimension name -> calibration sources (select.sources keys) scored for it")
    multiple_of: int = Field(8, gt=0, description="kept neurons per layer are rounded up to a multiple of this")
    per_layer_counts: bool = Field(
        False, description="allow a per-layer sparsity list; narrower layers are zero-padded to the widest, "
        "since a stock transformers config has one intermediate_size")

    @field_validator("dimensions")
    @classmethod
    def _check_dims(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = sorted(k for k, srcs in v.items() if not srcs)
        if empty:
            raise ValueError(f"dimensions {empty} name no sources")
        return v


class CompressConfig(_Strict):
    """Compression (stage 2): one algorithm applied to every decoder-layer linear."""

    algorithm: str = "sparsegpt"
    quant: QuantConfig | None = Field(None, description="integer weight-only quantization (bits, group size); "
                                      "gptq: this or `scheme`; sparsegpt: sparse then quantized in one pass")
    scheme: str | None = Field(None, description="a quantization scheme by its compressed-tensors preset name: "
                               + ", ".join(SCHEMES) + "; with gptq, rtn or awq (AWQ: weight-only integer schemes)")
    smoothquant: SmoothQuantConfig | None = Field(None, description="SmoothQuant before quantizing (gptq or rtn)")
    awq: AWQConfig | None = Field(None, description="awq: the scaling grid (default when omitted)")
    kv_cache: KVCacheConfig | None = Field(None, description="an FP8 KV cache with calibrated scales")
    mixcal: MixCalConfig | None = Field(None, description="separate domain / general statistics, combined with λ")
    sparsity: float | list[float] = Field(0.5, description="fraction pruned; a list gives one value per decoder layer")
    owl: OWLConfig | None = Field(None, description="outlier-weighted layer-wise sparsity around `sparsity`")
    cus_prun: CusPrunConfig | None = Field(None, description="cus_prun: the dimensions and their sources")
    n_m: tuple[int, int] | None = Field(None, description="N:M semi-structured pattern, e.g. [2, 4]")
    block_size: int = Field(128, gt=0, description="SparseGPT lazy-update block (columns)")
    damping: float = Field(0.01, ge=0.0, description="fraction of mean(diag(H)) added to the Hessian")
    hessian_dtype: Literal["float32", "float64"] = Field(
        "float32", description="accumulator of the calibration statistics; float64 makes them bit-identical "
        "whatever the number of actors, at twice the memory")
    micro_batch: int = Field(4, gt=0, description="calibration sequences per forward pass of a decoder layer")
    targets: list[str] | None = Field(None, description="module names inside a decoder layer; default: all linears")
    moe: MoEConfig | None = Field(None, description="mixture-of-experts models: the low-token policy "
                                  "(default: min_tokens_per_expert 1, policy fallback)")

    @field_validator("n_m", mode="before")
    @classmethod
    def _nm_as_tuple(cls, v):
        return tuple(v) if isinstance(v, list) else v  # YAML has lists; the items stay strictly ints

    @field_validator("n_m")
    @classmethod
    def _check_nm(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 < v[0] < v[1]):
            raise ValueError(f"n_m must be [N, M] with 0 < N < M, got {list(v)}")
        return v

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity_range(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(not 0.0 <= x < 1.0 for x in values):
            raise ValueError(f"sparsity must be in [0, 1) (or a non-empty list of such), got {v}")
        return v

    @model_validator(mode="after")
    def _check_sparsity(self) -> "CompressConfig":
        if self.owl is not None and isinstance(self.sparsity, list):
            raise ValueError("owl computes per-layer sparsity itself: give one target sparsity, not a list")
        return self

    def for_layer(self, sparsity: float) -> "CompressConfig":
        """This recipe with one layer's sparsity."""
        return self.model_copy(update={"sparsity": sparsity, "owl": None})

    @property
    def quantized(self) -> bool:
        """Whether this recipe writes quantized weights (`quant` or `scheme`)."""
        return self.quant is not None or self.scheme is not None

    @field_validator("scheme")
    @classmethod
    def _check_scheme(cls, v: str | None) -> str | None:
        if v is not None and v.upper() not in SCHEMES:
            raise ValueError(f"unknown scheme '{v}'; known: {', '.join(SCHEMES)}")
        return None if v is None else v.upper()

    @model_validator(mode="after")
    def _check_quant(self) -> "CompressConfig":
        quantizers = ("gptq", "rtn", "awq")
        if self.algorithm in quantizers and not self.quantized:
            raise ValueError(f"algorithm '{self.algorithm}' needs a 'scheme' (e.g. W4A16) or a 'quant' section")
        if self.quant is not None and self.scheme is not None:
            raise ValueError("give 'scheme' or 'quant', not both")
        if self.quant is not None and self.algorithm not in ("gptq", "sparsegpt", "rtn", "awq"):
            raise ValueError(f"'quant' is supported with gptq, rtn, awq or sparsegpt, not '{self.algorithm}'")
        if self.scheme is not None and self.algorithm not in quantizers + ("sparsegpt",):
            raise ValueError(f"'scheme' is supported with gptq, rtn, awq or sparsegpt, not '{self.algorithm}'")
        if self.scheme is not None and self.algorithm in ("awq", "sparsegpt") and self.scheme not in WEIGHT_ONLY_INT:
            raise ValueError(f"algorithm '{self.algorithm}' takes a weight-only integer scheme "
                             f"({', '.join(WEIGHT_ONLY_INT)}), not '{self.scheme}'")
        if self.awq is not None and self.algorithm != "awq":
            raise ValueError("an 'awq' section needs algorithm 'awq'")
        if self.smoothquant is not None and (self.algorithm not in ("gptq", "rtn") or not self.quantized):
            raise ValueError("'smoothquant' smooths before quantizing: it needs algorithm gptq or rtn and a scheme")
        if self.kv_cache is not None and not self.quantized:
            raise ValueError("'kv_cache' is written with a quantized checkpoint: give a 'scheme' too")
        if self.quant is not None and self.quant.group_size and self.block_size % self.quant.group_size:
            raise ValueError(f"block_size={self.block_size} must be a multiple of quant.group_size={self.quant.group_size}")
        return self

    @model_validator(mode="after")
    def _check_cus_prun(self) -> "CompressConfig":
        structured = self.algorithm == "cus_prun"
        if structured != (self.cus_prun is not None):
            raise ValueError("algorithm 'cus_prun' needs a 'cus_prun' section, and only it takes one")
        if structured and (self.quant or self.mixcal or self.owl or self.n_m):
            raise ValueError("cus_prun removes whole neurons: quant, mixcal, owl and n_m do not apply")
        if structured and isinstance(self.sparsity, list) and not self.cus_prun.per_layer_counts:
            raise ValueError("cus_prun keeps one neuron count per layer: a sparsity list needs "
                             "cus_prun.per_layer_counts: true")
        return self

    @model_validator(mode="after")
    def _check_block(self) -> "CompressConfig":
        if self.n_m is not None and self.block_size % self.n_m[1]:
            raise ValueError(f"block_size={self.block_size} must be a multiple of M={self.n_m[1]} for N:M")
        return self


class TaskConfig(_Strict):
    """One evaluation task, as written in a task YAML file (`jobs/tasks/*.yaml`).

    Templates (`prompt`, `choices`, `target`, `description`) are Jinja, rendered with one data item's
    fields, the syntax lm-evaluation-harness task files use (`{{question.strip()}}`, `{{choices[0]}}`).
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: Literal["perplexity", "multiple_choice"]
    path: str = Field(..., description="the data file: a URI, or a path relative to the folder of the file "
                      "that names it (the task file, or the job file for an inline task)")
    format: str = Field("jsonl", description="reader: jsonl, text (whole file), wikitext (articles of a raw dump)")
    domain: str = Field("general", description="domain tag (general, biomed, ...): results are averaged per tag")
    group: str | None = Field(None, description="tasks sharing a group are averaged (size-weighted) together")
    description: str = Field("", description="multiple choice: text before the few-shot examples")
    prompt: str = Field("{{text}}", description="perplexity: the document text; multiple choice: the question")
    choices: list[str] | None = Field(None, description="multiple choice: one template per answer")
    target: str | None = Field(None, description="multiple choice: renders to the answer's index or text")
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = Field(0, ge=0)
    fewshot_path: str | None = Field(None, description="file of few-shot examples (first num_fewshot are used)")
    metrics: list[str] = Field(default_factory=list, description="default: acc, acc_norm / word_perplexity, ...")
    primary: str | None = Field(None, description="the headline metric; default the first of `metrics`")
    detokenize: str | None = Field(None, description="perplexity: a registered text filter, e.g. wikitext")
    limit: int | None = Field(None, gt=0, description="score the first N items / documents")
    max_tokens: int | None = Field(None, gt=0, description="perplexity: score at most this many tokens")
    max_length: int | None = Field(None, gt=1, description="perplexity window (tokens); default the model's maximum")
    stride: int | None = Field(None, gt=0, description="perplexity: new tokens per window after the first; default max_length")

    @model_validator(mode="after")
    def _check_kind(self) -> "TaskConfig":
        if self.kind == "multiple_choice" and (not self.choices or self.target is None):
            missing = "choices" if not self.choices else "target"
            raise ValueError(f"a multiple_choice task needs '{missing}' (e.g. choices: ['{{{{sol1}}}}', '{{{{sol2}}}}'], target: '{{{{label}}}}')")
        if self.num_fewshot and not self.fewshot_path:
            raise ValueError("num_fewshot > 0 needs 'fewshot_path' (the file the examples come from)")
        if self.stride and self.max_length and self.stride > self.max_length:
            raise ValueError(f"stride={self.stride} must be <= max_length={self.max_length}")
        if self.primary and self.metrics and self.primary not in self.metrics:
            raise ValueError(f"primary '{self.primary}' is not one of metrics {self.metrics}")
        return self


class TaskOverride(_Strict):
    """A job's reference to a task file by name, with fields to override (limit, max_tokens, ...)."""

    name: str
    path: str | None = None
    format: str | None = None
    domain: str | None = None
    group: str | None = None
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    max_length: int | None = Field(None, gt=1)
    stride: int | None = Field(None, gt=0)


def _task_entry_kind(v: object) -> str:
    if isinstance(v, (str, TaskOverride, TaskConfig)):
        return {str: "name", TaskOverride: "ref", TaskConfig: "inline"}[type(v)]
    return "inline" if isinstance(v, dict) and "kind" in v else "ref"


TaskEntry = Annotated[Union[Annotated[str, Tag("name")], Annotated[TaskOverride, Tag("ref")],
                            Annotated[TaskConfig, Tag("inline")]], Discriminator(_task_entry_kind)]


class EvaluateConfig(_Strict):
    """Evaluation (stage 3): which tasks, and how the scoring pool runs."""

    tasks: list[TaskEntry] = Field(
        default_factory=list, description="a task or group name (looked up in task_dirs), a path to a task YAML, "
        "{name: ..., limit: ...} overriding a task file's fields, or a whole inline task")
    task_dirs: list[str] = Field(default_factory=list, description="folders (relative to the job file, or URIs) "
                                 "searched recursively for task YAML files, before the shipped tasks "
                                 "(the project's jobs/tasks), which are always searched last")
    batch_tokens: int = Field(1024, gt=0, description="tokens per forward batch (about 1k is fastest on a CPU "
                              "core; raise it on GPUs)")
    unit_tokens: int = Field(2048, gt=0, description="tokens per work unit sent to an actor (units are "
                             "fixed before actors start, so results do not depend on the actor count)")
    include_dense: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device_map: Literal["auto"] | None = Field(None, description="auto: each actor loads its model with "
                                               "accelerate's device map over the GPUs it holds (ray.gpus_per_actor), "
                                               "offloading to CPU memory / disk what does not fit")
    max_actor_restarts: int = Field(3, ge=0, description="replacements of dead eval actors before giving up")


class RayConfig(_Strict):
    """Where the work runs: the Ray cluster and the resources of each actor kind."""

    address: str | None = Field(None, description="None starts a local Ray; 'auto' joins a cluster")
    num_cpus: int | None = Field(None, gt=0, description="local Ray only: CPUs to offer")
    object_store_memory: int | None = Field(
        None, ge=78643200, description="local Ray only: bytes of shared memory for the object store (at least "
        "75 MiB, Ray's minimum); objects beyond it spill to disk. Default: Ray's (30 percent of memory)")
    bind_host: str | None = Field(
        "127.0.0.1", min_length=1, description="local Ray only: the address its processes listen on and advertise; "
        "a loopback address (default) keeps every port (GCS, raylet, workers, agents, dashboard, metrics) on "
        "loopback; null: Ray's default (the machine's routable address, every interface)")
    resource_wait_s: float = Field(
        0.0, ge=0, le=86400, allow_inf_nan=False, description="seconds `run` waits for the cluster to offer every request of the job (an autoscaling "
        "cluster adding nodes) before refusing it; 0: refuse at once")
    compress_actors: int = Field(1, gt=0)
    eval_actors: int = Field(1, gt=0)
    select_actors: int = Field(1, gt=0, description="tokenize/score actors of the select stage")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads per actor; default cpus_per_actor")
    collective: Literal["auto", "object_store", "nccl", "gloo"] = Field(
        "auto", description="how compression statistics reach their owner: a tree through the object store, or "
        "a ray.util.collective reduce (nccl between GPU actors, gloo between CPU actors); auto: nccl when every "
        "actor holds a GPU, else the object store")


class StorageConfig(_Strict):
    """Where files live besides the locations the job names (which may all be URIs)."""

    cache_dir: str | None = Field(
        None, description="node-local folder where remote models and files are cached (by content SHA-256); "
        "default: $RAYCOMPRESS_CACHE_DIR on each node, else /tmp/raycompress/cache. Never a shared or home folder")


class GMPScheduleConfig(_Strict):
    """Gradual magnitude pruning during `train` (Zhu & Gupta 2017, eq. 1; `algorithms.gmp`):
    sparsity rises from `initial_sparsity` to `final_sparsity` on the cubic schedule, pruning at
    steps start_step, start_step + interval, ..., start_step + n_prunes * interval."""

    initial_sparsity: float | None = Field(None, ge=0.0, lt=1.0,
                                           description="s_i; null = the checkpoint's measured sparsity")
    final_sparsity: float = Field(..., ge=0.0, lt=1.0, description="s_f, reached exactly at the last pruning step")
    start_step: int = Field(0, ge=0, description="t0, the first pruning step (optimizer steps)")
    n_prunes: int = Field(10, ge=1, description="n, the number of pruning intervals")
    interval: int = Field(10, ge=1, description="Δt, optimizer steps between pruning steps")
    scope: Literal["global", "layer"] = Field("global", description="one threshold over all linears, or per linear")

    @model_validator(mode="after")
    def _rising(self) -> "GMPScheduleConfig":
        if self.initial_sparsity is not None and self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"train.gmp: initial_sparsity {self.initial_sparsity} > final_sparsity "
                             f"{self.final_sparsity}; GMP only increases sparsity")
        return self

    @property
    def end(self) -> int:
        """The last pruning step (an optimizer step), start_step + n_prunes * interval."""
        return self.start_step + self.n_prunes * self.interval

    def check_within(self, steps: int) -> None:
        """The one budget rule: the last pruning step must be a step that runs (0 .. steps-1), so the
        final sparsity is reached. Raises ValueError naming the schedule and the budget."""
        if self.end >= steps:
            raise ValueError(f"train.gmp ends at step start_step + n_prunes * interval = {self.end}, outside "
                             f"train.steps = {steps} (steps 0..{steps - 1}); raise steps or shorten the schedule")


class TrainConfig(_Strict):
    """The optional `train` stage: sparse-preserving continued causal-LM pretraining (Sparse*BERT
    style sparse transfer) with Ray Train; pruned weights stay exactly zero."""

    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="ddp (gloo on CPU, nccl on GPU) or DeepSpeed ZeRO")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed only: ZeRO stage")
    offload: bool = Field(False, description="deepspeed only: offload optimizer state (and stage-3 params) to CPU")
    steps: int = Field(..., gt=0, description="optimizer steps")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay (keeps 0 at 0)")
    seq_len: int = Field(512, gt=1, description="tokens per packed training sequence")
    batch_size: int = Field(4, gt=0, description="sequences per worker per step")
    num_workers: int = Field(2, gt=0, description="Ray Train workers")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray Train worker")
    gpus_per_worker: float = Field(0.0, ge=0, le=1, description="GPUs per Ray Train worker (0: CPU, gloo; 1: one GPU each, nccl)")
    torch_threads: int = Field(1, gt=0, description="intra-op threads per worker (fixed: runs are reproducible)")
    sources: list[str] = Field(default_factory=list, description="select.sources whose documents form the "
                               "training stream (read with the select readers, packed to seq_len); empty: all")
    max_docs: int | None = Field(None, gt=0, description="read at most this many documents per source (in file order)")
    init: Literal["compressed", "dense"] = Field("compressed", description="start from the compress stage's "
                                                 "checkpoint (its zeros become the fixed mask) or from the dense model (GMP)")
    activation_checkpointing: bool = Field(False, description="recompute decoder-layer activations in backward")
    checkpoint_every: int = Field(0, ge=0, description="report a Ray Train checkpoint every N steps; 0 = at the end only")
    seed: int = 0
    gmp: GMPScheduleConfig | None = Field(None, description="null: keep the compressed checkpoint's mask fixed")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.strategy == "ddp" and self.offload:
            raise ValueError("train.offload needs train.strategy: deepspeed (DDP has no CPU offload)")
        if self.strategy == "deepspeed" and self.zero_stage == 3 and self.gmp is not None:
            raise ValueError("train.gmp with train.zero_stage: 3 is not supported (masks cannot be recomputed "
                             "from partitioned weights); use train.zero_stage: 2 or drop train.gmp")
        if self.gmp is not None:
            self.gmp.check_within(self.steps)
        return self


class JobConfig(_Strict):
    """A whole job: model plus the three stages and the Ray placement."""

    name: str = "job"
    model: str = Field(..., description="a Hugging Face folder: local path, URI (s3://, gs://, hdfs://, file://), "
                       "or a known alias (smollm2-135m-instruct)")
    select: SelectConfig
    compress: CompressConfig
    evaluate: EvaluateConfig
    train: TrainConfig | None = Field(None, description="optional sparse-preserving domain pretraining after compress")
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    base_dir: str = Field(".", description="relative paths in the job file resolve against this: the job "
                          "file's folder (set by the loader)")

    @model_validator(mode="after")
    def _check_compress_sources(self) -> "JobConfig":
        c = self.compress
        named = list(c.mixcal.general_sources) if c.mixcal else []
        named += [s for srcs in (c.cus_prun.dimensions.values() if c.cus_prun else []) for s in srcs]
        named += list(self.train.sources) if self.train else []
        unknown = sorted(set(named) - set(self.select.sources))
        if unknown:
            raise ValueError(f"compress / train name calibration sources {unknown} that select.sources does not "
                             f"define; sources are {sorted(self.select.sources)}")
        return self

    def resolve(self, path: str) -> str:
        """A location from the job file: a URI as it is, a local path made absolute against the
        job's base directory."""
        if "://" in path:
            return path
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (Path(self.base_dir) / p).resolve())


def config_error(headline: str, exc: ValidationError) -> ConfigError:
    """One ConfigError: `headline`, then a line per wrong field with its dotted path."""
    lines = [headline] + [f"  field '{'.'.join(str(x) for x in e['loc']) or '<top>'}': {e['msg']}" for e in exc.errors()]
    return ConfigError("\n".join(lines))


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping.

    Raises:
        ConfigError: '<what> not found', not YAML, or not a mapping; naming the file.
    """
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path) -> JobConfig:
    """Read and validate a job YAML file.

    Raises:
        ConfigError: the file is missing, is not YAML, or a field is wrong; the message names
            the file and the dotted field path (e.g. ``compress.sparsity``).
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "job file")
    raw.setdefault("base_dir", str(path.resolve().parent))  # paths in a file are relative to that file
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error(f"{path}: invalid job config", exc) from exc

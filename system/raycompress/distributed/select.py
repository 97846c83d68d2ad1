"""Select stage on Ray Data, streaming: the driver never holds the corpus.

Per source:
  pass 1 (survey): read -> parse; only small columns (path, row, reason, hash, detail) are kept, to
    count skipped records by reason and file (a file that cannot be read is one "unreadable_file"
    and its error text, never a failed run), find exact duplicates (all but the first by
    (path, row)), and, for `zipf`, count words.
  pass 2 (round 1): read -> parse -> keep usable, non-duplicate documents -> `ShardSelector`
    actors tokenize, pack and select k winners per shard.
Then the driver merges the winners (round 2), mixes the sources (or, in `kcenter` mode, cuts the
union with k-center greedy on sentence embeddings) and writes `calibration.parquet` and
`manifest.json` with a fingerprint of inputs, method, config and seed, the skip counts
(`skipped`: source -> file -> reason -> n) and the read errors (`file_errors`: source -> file ->
error text).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raycompress.config import JobConfig
from raycompress.distributed import metrics
from raycompress.data.corpus import parse_records
from raycompress.data.readers import (FILE_ERRORS, CorpusPathError, chaos_env, expand_paths, infer_format, read_plan,
                                      record_byte_limit)
from raycompress.distributed.readers import CorpusDatasource
from raycompress.models.fetch import ModelRef
from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, Window
from raycompress.selection.mix import quotas
from raycompress.selection.shard import ShardSelector, rows_to_windows
from raycompress.storage import uri

log = logging.getLogger(__name__)


class SelectionError(ValueError):
    """A source has no usable documents, or fewer candidate windows than asked for."""


def source_docs(job: JobConfig, name: str, files: dict[str, str], parse_cpus: float | None = None):
    """Parsed documents of one source; `files` is location -> label (`expand_paths`); `parse_cpus`:
    CPUs each parse task reserves (None: Ray Data's default of 1). With
    `format: auto` each file is read in its own format (inferred from its name), so a glob may mix
    formats; a file whose format cannot be inferred is counted "unreadable_file".

    Raises:
        CorpusPathError: `format: auto` and no file's format can be inferred (the first is named).
    """
    import ray.data

    src = job.select.sources[name]
    if src.format == "auto" and not any(_inferable(label) for label in files.values()):
        infer_format(uri.name(next(iter(files))))  # raises, naming the file
    fs, paths = read_plan(list(files))
    source = CorpusDatasource(paths, fmt=src.format, text_field=src.text_field, shard_docs=job.select.shard_docs,
                              labels=dict(zip(paths, files.values())), filesystem=fs,
                              max_bytes=record_byte_limit(src.max_doc_chars))
    env = chaos_env()  # failure injection (tests) reaches the read tasks; none in a normal run
    # One read task per file, never split (a block is a shard: results must not depend on the
    # cluster size). Reads take no CPU slot, so they never starve behind the actors, and at most
    # `select_actors` run at once (no more than there are files, or Ray Data warns), so they do
    # not flood the node with worker processes.
    ds = ray.data.read_datasource(source, override_num_blocks=len(paths), num_cpus=0,
                                  concurrency=min(job.ray.select_actors, len(paths)),
                                  **({"runtime_env": {"env_vars": env}} if env else {}))
    return ds.map_batches(parse_records, batch_format="numpy", batch_size=None,
                          **({} if parse_cpus is None else {"num_cpus": parse_cpus}), fn_kwargs={"source": name, "fmt": src.format, "text_field": src.text_field,
                                     "max_chars": src.max_doc_chars})


def _inferable(label: str) -> bool:
    try:
        infer_format(label)
    except CorpusPathError:
        return False
    return True


def _first_of_group(batch: dict) -> dict:
    """map_groups: for one content hash, the (path, row) of every copy but the first."""
    order = sorted(zip(batch["path"], batch["row"]))
    return {"path": [p for p, _ in order[1:]], "row": [int(r) for _, r in order[1:]]}


def _survey(docs, dedup: bool) -> tuple[dict, dict, set, int]:
    """(skip counts {file: {reason: n}}, errors {file: error text} of the files that could not be
    read, duplicate (path, row) keys, usable documents)."""
    from ray.data.expressions import col

    small = docs.select_columns(["path", "row", "reason", "hash", "detail"]).materialize()
    skipped: dict[str, dict[str, int]] = {}
    usable = 0
    # as many hash partitions as blocks (Ray's default is 200, whose tasks dominate a small job)
    parts = max(1, small.num_blocks())
    for r in small.groupby(["path", "reason"], num_partitions=parts).count().take_all():
        if r["reason"]:
            skipped.setdefault(r["path"], {})[r["reason"]] = int(r["count()"])
        else:
            usable += int(r["count()"])
    errors: dict[str, str] = {}
    if any("unreadable_file" in reasons for reasons in skipped.values()):
        for r in small.filter(expr=col("reason") == "unreadable_file").take_all():
            errors[str(r["path"])] = str(r["detail"])
    drop: set = set()
    if dedup and usable:
        good = small.filter(expr=col("reason") == "")
        for r in good.groupby("hash", num_partitions=parts).map_groups(_first_of_group, batch_format="numpy").take_all():
            drop.add((str(r["path"]), int(r["row"])))
        for path, _ in drop:
            skipped.setdefault(path, {})["duplicate"] = skipped.get(path, {}).get("duplicate", 0) + 1
    return skipped, dict(sorted(errors.items())), drop, usable - len(drop)


def _word_freq(docs, parts: int) -> dict[str, int]:
    from raycompress.selection.zipf import word_counts

    def count(batch):
        c = word_counts([t for t, r in zip(batch["text"], batch["reason"]) if r == ""])
        return {"word": list(c), "n": list(c.values())}

    counts = docs.map_batches(count, batch_format="numpy", batch_size=None)
    agg = counts.groupby("word", num_partitions=max(1, parts)).sum("n")  # one per file, not Ray's 200
    return {r["word"]: int(r["sum(n)"]) for r in agg.iter_rows()}


def _keep(batch: dict, drop: set) -> dict:
    mask = np.array([r == "" and (str(p), int(w)) not in drop for r, p, w in zip(batch["reason"], batch["path"], batch["row"])], dtype=bool)
    return {k: np.asarray(v)[mask] for k, v in batch.items()}


def _round1(job: JobConfig, docs, drop: set, model: ModelRef, k: int, ctx: SelectContext,
            n_files: int) -> list[Window]:
    from ray.data import ActorPoolStrategy

    from raycompress.distributed.resources import actor_options

    method = SELECTORS.get(job.select.method)
    opts = actor_options(job.ray) if method.needs & {"model", "router"} else \
        {"num_cpus": job.ray.cpus_per_actor, "num_gpus": 0}
    # at least one shard per file: a pool that starts with more actors than that makes Ray Data
    # warn; it grows to `select_actors` when a file has more shards
    pool = ActorPoolStrategy(min_size=min(job.ray.select_actors, n_files), max_size=job.ray.select_actors)
    winners = docs.map_batches(_keep, fn_kwargs={"drop": drop}, batch_format="numpy", batch_size=None).map_batches(
        ShardSelector, batch_size=None, batch_format="numpy", compute=pool,
        fn_constructor_kwargs={"model": model, "seq_len": job.select.seq_len, "method": job.select.method,
                               "k": k, "ctx": ctx}, **opts,
    )
    return rows_to_windows(winners.take_all())


def _hash_file(location: str, cache_dir: str | None, retried: tuple[str, ...] = ()) -> tuple[str, int]:
    """(hex SHA-256 of every byte as stored, bytes) of a corpus file, through the node's digest
    cache (`storage.cache.NodeCache.digest`, the same digest the stage guard compares); ("", 0)
    when it cannot be opened at all: its read counts it "unreadable_file".

    Raises:
        only an error whose message holds one of `retried` (a storage hiccup, not the file's).
    """
    from raycompress.storage.cache import NodeCache

    try:
        return NodeCache(cache_dir).digest(location), uri.info(location).size
    except FILE_ERRORS as exc:
        if any(p in str(exc) for p in retried):
            raise
    return "", 0


def _input_records(name: str, files: dict[str, str], cache_dir: str | None) -> list[dict]:
    """{source, path: label, location (no query), bytes, sha256} per file; files are hashed in
    parallel as Ray tasks, on whichever nodes have room, reading from where the files are."""
    import ray

    import ray.data

    retried = tuple(ray.data.DataContext.get_current().retried_io_errors or ())
    task = ray.remote(num_cpus=0.25)(_hash_file)
    hashes = ray.get([task.remote(loc, cache_dir, retried) for loc in files])
    return [{"source": name, "path": label, "location": uri.display(loc), "bytes": n, "sha256": digest}
            for (loc, label), (digest, n) in zip(files.items(), hashes)]


def run_select(job: JobConfig, model: ModelRef | str | Path, out_dir: str | Path) -> dict:
    """Run selection and write the calibration set into `out_dir` (a local path or URI); returns
    the manifest. Corpus files are identified by content and label, never by location, so the
    fingerprint and `calibration_sha256` are the same wherever the inputs and output are.

    Raises:
        CorpusPathError: a source path matches nothing.
        SelectionError: a source has no usable documents, or fewer candidate windows than its
            quota (the numbers are in the message).
    """
    _quiet_ray_data()
    model = model if isinstance(model, ModelRef) else ModelRef(str(model), job.storage.cache_dir)
    sel = job.select
    base = Path(job.base_dir)
    method = SELECTORS.get(sel.method)
    want = quotas(sel.n_samples, sel.mix) if sel.multi_source == "mix" else {s: sel.n_samples for s in sel.sources}
    chosen: list[Window] = []
    inputs, skipped, errors, usable = [], {}, {}, {}
    routing = _Routing(sel) if "router" in method.needs else None
    for i, name in enumerate(tqdm(sorted(sel.sources), desc="select", unit="source", disable=None)):
        if want.get(name, 0) == 0:
            continue
        files = expand_paths(sel.sources[name].path, base)
        inputs += _input_records(name, files, job.storage.cache_dir)
        docs = source_docs(job, name, files)
        skipped[name], errors[name], drop, usable[name] = _survey(docs, sel.dedup)
        n_skipped = sum(n for reasons in skipped[name].values() for n in reasons.values())
        metrics.record("raycompress_documents", usable[name] + n_skipped, job.name, source=name, state="read")
        metrics.record("raycompress_documents", n_skipped, job.name, source=name, state="skipped")
        log.info("select[%s]: %d documents usable, %d skipped", name, usable[name], n_skipped)
        for label, error in errors[name].items():
            log.warning("select[%s]: %s could not be read to its end (counted unreadable_file; the records "
                        "before the error are kept): %s", name, label, error)
        if usable[name] == 0:
            raise SelectionError(f"select.sources.{name}: no usable documents in {sorted(files.values())} "
                                 f"(skipped: {skipped[name]})")
        ctx = SelectContext(seed=sel.seed + i, candidate_pool=sel.candidate_pool,
                            word_freq=_word_freq(docs, len(files)) if "word_freq" in method.needs else None,
                            extra=routing.context() if routing else {})
        winners = _round1(job, docs, drop, model, want[name], ctx, len(files))
        if len(winners) < want[name]:
            raise SelectionError(f"select.sources.{name}: {len(winners)} candidate windows of {sel.seq_len} tokens "
                                 f"from {usable[name]} usable documents, fewer than the {want[name]} asked for")
        picked = method.merge(winners, want[name], routing.on_driver(ctx, model) if routing else ctx)
        if routing:
            routing.chose(name, picked, ctx)
        chosen += picked
    if sel.multi_source == "kcenter":
        chosen = _kcenter(chosen, sel.n_samples, sel.embedder, model)
    for name in sel.sources:
        metrics.record("raycompress_documents", sum(w.source == name for w in chosen), job.name, source=name,
                       state="selected")
    extra = {"routing_coverage": routing.coverage} if routing else {}
    return _write_outputs(job, str(out_dir), chosen, inputs, {"skipped": skipped, "file_errors": errors, **extra},
                          usable, want)


class _Routing:
    """Routing-aware selection's driver side: the coverage target in each source's context, one
    router probe on the driver for the merge rounds, the tokens the sources chosen so far route
    (the next source's `routing_prior`, so a mix covers the experts together), and the coverage
    of each source's merge for the manifest."""

    def __init__(self, sel) -> None:
        from raycompress.config import RoutingSelectConfig

        self.cfg = sel.routing or RoutingSelectConfig()
        self.probe, self.prior, self.coverage = None, None, {}

    def context(self) -> dict:
        out = {"min_tokens_per_expert": self.cfg.min_tokens_per_expert, "beta": self.cfg.beta,
               "probe_layers": self.cfg.probe_layers}
        return out if self.prior is None else {**out, "routing_prior": self.prior}

    def on_driver(self, ctx: SelectContext, model: ModelRef) -> SelectContext:
        if self.probe is None:
            from raycompress.selection.router_probe import load_probe

            self.probe = load_probe(model.local(), self.cfg.probe_layers)
        ctx.extra["route_fn"] = self.probe
        return ctx

    def chose(self, source: str, picked: list[Window], ctx: SelectContext) -> None:
        from raycompress.selection.routing import window_counts

        routed = window_counts(picked, ctx).sum(0) if picked else None
        if routed is not None:
            self.prior = routed if self.prior is None else self.prior + routed
        cov = ctx.extra.get("routing_coverage", {}).get("merge")
        self.coverage[source] = cov.summary() if cov is not None else None


class _DropFalseHangWarning(logging.Filter):
    """Ray Data warns "The Dataset job will hang unless more CPUs are freed" when, as a dataset
    starts, `ray.available_resources()` shows no free CPU: a snapshot taken while the last
    dataset's tasks or actor pool are still handing theirs back, or while this job's other actors
    hold them. Our reads ask for 0 CPUs and our pools release theirs, so nothing hangs: the
    warning is false, and only it is dropped (Ray-internal; one logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Dataset job will hang" not in record.getMessage()


def _quiet_ray_data() -> None:
    """This driver's Ray Data context for selection: order preserved; Ray Data's per-dataset
    progress lines and bars off (the stage reports its own progress: one line per source, the
    select tqdm bar on a terminal)."""
    import warnings

    import ray.data

    with warnings.catch_warnings():  # Ray's own DataContext() defaults set its deprecated fields
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False  # "Starting execution of Dataset ..." / "Execution plan ..."
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    ds_log = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _DropFalseHangWarning) for f in ds_log.filters):
        ds_log.addFilter(_DropFalseHangWarning())


def _kcenter(windows: list[Window], k: int, embedder: str, model: ModelRef) -> list[Window]:
    from transformers import AutoTokenizer

    from raycompress.selection.kcenter import embed_texts, k_center_greedy, resolve_embedder

    tok = AutoTokenizer.from_pretrained(model.local(weights=False), trust_remote_code=False)
    emb = embed_texts([tok.decode(w.input_ids) for w in windows], resolve_embedder(embedder))
    return [windows[i] for i in k_center_greedy(emb, k)]


def _fingerprint(inputs: list[dict], config: dict) -> str:
    """SHA-256 of (source, label, content SHA-256) per input file and the config without the
    sources' locations (the files they matched are already in by content); no location enters."""
    config = {**config, "sources": {k: {f: v for f, v in src.items() if f != "path"} for k, src in config["sources"].items()}}
    src = json.dumps({"inputs": [(x["source"], x["path"], x["sha256"]) for x in inputs], "config": config}, sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()


def _write_outputs(job, out_dir: str, chosen, inputs, rejects: dict, usable, want) -> dict:
    """`rejects`: {"skipped": {source: {file: {reason: n}}}, "file_errors": {source: {file: error}}}."""
    rows = [{"input_ids": w.input_ids.tolist(), "source": w.source, "doc_id": w.doc_ids[0], "doc_ids": w.doc_ids,
             "uid": w.uid, "score": float(w.score), "n_concepts": int(len(w.concepts))} for w in chosen]
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("source", pa.string()), ("doc_id", pa.string()),
                        ("doc_ids", pa.list_(pa.string())), ("uid", pa.string()), ("score", pa.float64()),
                        ("n_concepts", pa.int64())])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    parquet = buf.getvalue().to_pybytes()
    written = uri.write_bytes(uri.join(out_dir, "calibration.parquet"), parquet)
    config = {"model": job.model, "select": job.select.model_dump(mode="json", exclude={"sources"}),
              "sources": {k: v.model_dump(mode="json") for k, v in job.select.sources.items()}}
    manifest = {
        "fingerprint": _fingerprint(inputs, config), "method": job.select.method,
        "method_source": SELECTORS.get(job.select.method).source, "inputs": inputs, "config": config,
        "seed": job.select.seed, "quotas": want, "usable_documents": usable, **rejects,
        "selected": [{"source": r["source"], "uid": r["uid"], "doc_id": r["doc_id"], "score": r["score"]} for r in rows],
        "calibration_sha256": hashlib.sha256(parquet).hexdigest(),
    }
    written += uri.write_text(uri.join(out_dir, "manifest.json"), json.dumps(manifest, indent=2))
    metrics.record("raycompress_bytes_written", written, job.name, stage="select")
    log.info("selected %d sequences of %d tokens: %s", len(rows), job.select.seq_len, want)
    return manifest


def load_calibration(path: str | Path):
    """(input_ids (n, seq) int64 tensor, table) from a calibration Parquet file (local or URI).

    Raises:
        FileNotFoundError: the file is missing (run the select stage first).
    """
    import torch

    if not uri.is_file(path):
        raise FileNotFoundError(f"{uri.display(path)} not found: run `raycompress select` first")
    table = pq.read_table(pa.BufferReader(uri.read_bytes(path)))
    return torch.tensor(table.column("input_ids").to_pylist(), dtype=torch.long), table

"""Properties of the job loader (config.load_config) on arbitrary values of its numeric fields: a
value either loads unchanged (as a number: 2.0 may load as the int 2) or is refused with
ConfigError naming the field; never another exception, and a YAML boolean is never taken as a
number.

Booleans *inside* a list or mapping (compress.n_m, compress.sparsity as a list, select.mix) and in
ray.gpus_per_actor (a float or "auto") are refused too, and so is a quoted number ("5"): the
models validate in pydantic's strict mode.
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from raycompress.config import ConfigError, load_config

SETTINGS = settings(max_examples=50, deadline=None)

BASE = {"model": "some/model", "select": {"sources": {"a": {"path": "a.jsonl"}, "b": {"path": "b.jsonl"}}},
        "compress": {"algorithm": "sparsegpt"}, "evaluate": {"tasks": []}}
GPTQ = {"compress": {"algorithm": "gptq", "quant": {}}}
MIXCAL = {"compress": {"algorithm": "sparsegpt", "mixcal": {"general_sources": ["b"]}}}
OWL = {"compress": {"algorithm": "wanda", "owl": {}}}

# (dotted field, the job it is set in): every int / float field of a job file
NUMERIC_FIELDS = [
    ("select.n_samples", None), ("select.seq_len", None), ("select.seed", None), ("select.candidate_pool", None),
    ("select.shard_docs", None), ("select.sources.a.max_doc_chars", None),
    ("compress.sparsity", None), ("compress.block_size", None), ("compress.damping", None),
    ("compress.micro_batch", None), ("compress.n_m", None),
    ("compress.quant.group_size", GPTQ), ("compress.quant.bits", GPTQ),
    ("compress.mixcal.lam", MIXCAL), ("compress.owl.lam", OWL), ("compress.owl.m", OWL),
    ("evaluate.batch_tokens", None), ("evaluate.unit_tokens", None), ("evaluate.max_actor_restarts", None),
    ("ray.num_cpus", None), ("ray.torch_threads", None), ("ray.cpus_per_actor", None),
    ("ray.compress_actors", None), ("ray.eval_actors", None), ("ray.select_actors", None),
    ("ray.object_store_memory", None), ("ray.gpus_per_actor", None), ("ray.resource_wait_s", None),
]


def _job(field: str, value, extra: dict | None) -> dict:
    raw = copy.deepcopy(BASE)
    for section, body in copy.deepcopy(extra or {}).items():
        raw[section] = {**raw[section], **body}
    *parents, name = field.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[name] = value
    return raw


def _load(raw: dict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_config(path)


def _get(cfg, field: str):
    node = cfg
    for key in field.split("."):
        node = node[key] if isinstance(node, dict) else getattr(node, key)
    return node


def _same_number(loaded, given_value) -> bool:
    if isinstance(loaded, bool) or not isinstance(loaded, (int, float)):
        return False
    if isinstance(given_value, float) and math.isnan(given_value):
        return isinstance(loaded, float) and math.isnan(loaded)
    return loaded == given_value


def _preserved(loaded, given_value) -> bool:
    """`loaded` is `given_value`: None, a number equal to it, or a list/tuple of such."""
    if given_value is None:
        return loaded is None
    if isinstance(given_value, list):
        return isinstance(loaded, (list, tuple)) and len(loaded) == len(given_value) and \
            all(_same_number(a, b) for a, b in zip(loaded, given_value))
    return _same_number(loaded, given_value) and not isinstance(given_value, (bool, str, dict))


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text != "auto"  # gpus_per_actor's one word
    return False


NUMBERS = st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True) | \
    st.sampled_from([0, 1, 2, 4, 8, 16, 64, 128, 0.0, 0.25, 0.5, 0.99, 1.0, -1])
WORDS = st.text("abcxyz_", min_size=1, max_size=6).filter(_not_a_number)
SCALARS = NUMBERS | st.booleans() | st.none() | WORDS
VALUES = SCALARS | st.lists(NUMBERS | st.none() | WORDS, max_size=3) | \
    st.dictionaries(st.sampled_from("abc"), NUMBERS, max_size=2)


def _check(field: str, extra: dict | None, value) -> None:
    try:
        cfg = _load(_job(field, value, extra))
    except ConfigError as exc:
        assert field.rsplit(".", 1)[-1] in str(exc), f"{field}: the error does not name the field: {exc}"
        return
    assert not isinstance(value, bool), f"{field}: {value!r} was taken as the number {_get(cfg, field)!r}"
    assert _preserved(_get(cfg, field), value), f"{field}: {value!r} loaded as {_get(cfg, field)!r}"


@SETTINGS
@given(st.sampled_from(NUMERIC_FIELDS), VALUES)
def test_numeric_field_loads_unchanged_or_raises_config_error(field_extra, value):
    field, extra = field_extra
    if field == "ray.gpus_per_actor" and isinstance(value, bool):
        value = 2  # its boolean case: test_a_boolean_inside_a_list_or_mapping_is_never_a_number
    _check(field, extra, value)


@SETTINGS
@given(st.sampled_from(NUMERIC_FIELDS), st.booleans())
def test_a_boolean_is_never_a_number(field_extra, value):
    field, extra = field_extra
    if field == "ray.gpus_per_actor":
        return  # covered by test_a_boolean_inside_a_list_or_mapping_is_never_a_number
    with pytest.raises(ConfigError, match=field.rsplit(".", 1)[-1]):
        _load(_job(field, value, extra))


def test_valid_values_load_unchanged():
    """The property's other branch is reached: in-range values of every field load as given."""
    ok = {"select.n_samples": 8, "select.seq_len": 16, "select.seed": -3, "select.candidate_pool": 5,
          "select.shard_docs": 7, "select.sources.a.max_doc_chars": 100, "compress.sparsity": [0.5, 0.25],
          "compress.block_size": 64, "compress.damping": 0.1, "compress.micro_batch": 2, "compress.n_m": [2, 4],
          "compress.quant.group_size": 32, "compress.quant.bits": 8, "compress.mixcal.lam": 0.5,
          "compress.owl.lam": 0.1, "compress.owl.m": 3.0, "evaluate.batch_tokens": 512, "evaluate.unit_tokens": 99,
          "evaluate.max_actor_restarts": 0, "ray.num_cpus": 2, "ray.torch_threads": None, "ray.cpus_per_actor": 0.5,
          "ray.compress_actors": 2, "ray.eval_actors": 3, "ray.select_actors": 1,
          "ray.object_store_memory": 100_000_000, "ray.gpus_per_actor": 0.25, "ray.resource_wait_s": 30.0}
    assert set(ok) == {f for f, _ in NUMERIC_FIELDS}
    for field, extra in NUMERIC_FIELDS:
        assert _preserved(_get(_load(_job(field, ok[field], extra)), field), ok[field]), field


# a boolean where the loader's check of a field's own value does not look
NESTED_BOOLEANS = [("compress.n_m", lambda b: [b, 4]), ("compress.sparsity", lambda b: [0.5, b]),
                   ("select.mix", lambda b: {"a": b, "b": 1 - b}), ("ray.gpus_per_actor", lambda b: b)]


@SETTINGS
@given(st.sampled_from(NESTED_BOOLEANS), st.booleans())
@example(NESTED_BOOLEANS[0], True)
def test_a_boolean_inside_a_list_or_mapping_is_never_a_number(case, value):
    field, make = case
    with pytest.raises(ConfigError, match=field.rsplit(".", 1)[-1]):
        _load(_job(field, make(value), None))


@SETTINGS
@given(st.sampled_from(NUMERIC_FIELDS), NUMBERS)
@example(("select.n_samples", None), 5)
def test_a_quoted_number_is_not_taken_as_a_number(field_extra, number):
    field, extra = field_extra
    _check(field, extra, str(number))

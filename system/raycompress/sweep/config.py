"""What a sweep is: a base job file, axes of overrides and seeds, expanded into ordinary jobs.

    base: ../smollm2-biomed-sparsegpt50.yaml      # a job file, relative to this file
    name: biomed-calibration                      # default: the sweep file's name
    seeds: [0, 1, 2]                              # select.seed of each repeat
    parallel: 2                                   # points at once, at most (fewer when the cluster has no room)
    domain: biomed                                # the domain tag on the Pareto chart's y axis
    set:                                          # overrides for every point (dotted paths)
      select.sources.brown: {path: ../data/corpora/general_brown.jsonl}
    axes:
      algorithm:                                  # named variants: label -> overrides
        sparsegpt: {compress.algorithm: sparsegpt}
        wanda: {compress.algorithm: wanda}
      compress.mixcal.lam: [0.0, 0.1, 0.25]       # shorthand: the axis is the path, labels "lam=<value>"

A point is one variant of every axis (the Cartesian product), repeated once per seed. Its job is
the base job's YAML with `set`, then each variant's overrides applied (a dotted path replaces the
value there whole: `select.mix: {biomed: 1.0}` drops the base's other sources; `null` removes a
section), `select.seed` set to the seed, `name` made unique, and `evaluate.include_dense: false`
(the sweep evaluates the dense model once). Relative paths in overrides resolve against the base
job file's folder, as the job's own paths do. A sweep varies the recipe, not the model, the
evaluation, or where it runs: overrides under `model`, `evaluate`, `ray`, `storage` are refused.
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raycompress.config import ConfigError, JobConfig, config_error, read_yaml_mapping

LABEL = re.compile(r"^[A-Za-z0-9_.=:-]+$")
FIXED = ("model", "evaluate", "ray", "storage", "name", "base_dir")  # the same for every point


class SweepConfig(BaseModel):
    """The sweep file, validated (see the module docstring for its fields)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(..., description="the base job file, relative to the sweep file")
    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$")
    seeds: list[int] = Field(default_factory=list, description="select.seed per repeat; default the base job's")
    parallel: int = Field(1, gt=0, description="points run at once, at most")
    domain: str | None = Field(None, description="domain tag on the Pareto chart's y axis; default the first "
                               "non-general domain of the results")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides applied to every point")
    axes: dict[str, dict[str, dict[str, Any]] | list[Any]] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v


@dataclass
class Point:
    """One run of the sweep: `label` names its variants (the same for all its seeds)."""

    label: str
    seed: int
    variants: dict[str, str]
    job: JobConfig = field(repr=False)

    @property
    def folder(self) -> str:
        """Its run folder below the sweep's output folder."""
        return f"points/{self.label}/seed-{self.seed}"


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = copy.deepcopy(value)


def _variants(axis: str, spec: dict | list) -> dict[str, dict[str, Any]]:
    """{label: overrides} of one axis; the list shorthand makes `<last path part>=<value>` labels."""
    if isinstance(spec, list):
        out = {f"{axis.rsplit('.', 1)[-1]}={v}": {axis: v} for v in spec}
        if len(out) != len(spec):
            raise ValueError(f"axes.{axis}: values repeat")
        return out
    return spec


def _check_overrides(where: str, overrides: dict[str, Any]) -> None:
    for path in overrides:
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", path):
            raise ValueError(f"{where}: '{path}' is not a dotted field path (e.g. compress.sparsity)")
        if path.split(".")[0] in FIXED:
            raise ValueError(f"{where}: '{path}' cannot vary in a sweep ({', '.join(FIXED)} are the same for "
                             "every point; set them in the base job)")


def _point_job(raw: dict, base_dir: str, name: str, seed: int, overrides: dict, where: str) -> JobConfig:
    job_raw = copy.deepcopy(raw)
    for path, value in overrides.items():
        _set_path(job_raw, path, value)
    _set_path(job_raw, "select.seed", seed)
    job_raw.update(name=name, base_dir=base_dir)
    job_raw.setdefault("evaluate", {})["include_dense"] = False
    try:
        return JobConfig.model_validate(job_raw)
    except ValidationError as exc:
        raise config_error(f"{where}: the job it makes is invalid", exc) from exc


def expand(sweep: SweepConfig, base_raw: dict, base_dir: str, where: str) -> list[Point]:
    """Every point of the sweep, seeds innermost, each with its validated job.

    Raises:
        ConfigError: a bad axis or override, or a point whose job is invalid (named with the point).
    """
    try:
        _check_overrides(f"{where}: set", sweep.set)
        axes = {a: _variants(a, spec) for a, spec in sweep.axes.items()}
        for a, variants in axes.items():
            if not variants:
                raise ValueError(f"axes.{a}: no variants")
            for label, ov in variants.items():
                if not LABEL.fullmatch(label):
                    raise ValueError(f"axes.{a}: label '{label}' may use only letters, digits and _ . = : -")
                _check_overrides(f"axes.{a}.{label}", ov)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    seeds = sweep.seeds or [int((base_raw.get("select") or {}).get("seed", 0))]
    name = sweep.name or Path(where).stem
    points = []
    for combo in itertools.product(*[[(a, lab, ov) for lab, ov in v.items()] for a, v in axes.items()]):
        label = "+".join(lab for _, lab, _ in combo) or "base"
        overrides = {**sweep.set, **{k: v for _, _, ov in combo for k, v in ov.items()}}
        for seed in seeds:
            job = _point_job(base_raw, base_dir, f"{name}.{label}.s{seed}", seed, overrides,
                             f"{where}: point {label} seed {seed}")
            points.append(Point(label, seed, {a: lab for a, lab, _ in combo}, job))
    return points


def load_sweep(path: str | Path) -> tuple[SweepConfig, list[Point]]:
    """Read and validate a sweep file and expand it into its points.

    Raises:
        ConfigError: the sweep or base job file is missing, not YAML or invalid; the message
            names the file, the field, and for a point's job, the point.
    """
    path = Path(path)
    try:
        sweep = SweepConfig.model_validate(read_yaml_mapping(path, "sweep file"))
    except ValidationError as exc:
        raise config_error(f"{path}: invalid sweep", exc) from exc
    base = (path.resolve().parent / sweep.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: field 'base': job file not found: {base}")
    base_raw = read_yaml_mapping(base, "job file")
    base_dir = str(base.parent)
    if not sweep.name:
        sweep = sweep.model_copy(update={"name": path.stem})
    return sweep, expand(sweep, base_raw, base_dir, str(path))

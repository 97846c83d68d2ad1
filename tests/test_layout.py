"""The package's import directions, read from the source with `ast` (imports inside functions
included; nothing is imported):
- Ray only in `distributed/` (the Ray shells), and `submit.py`: the Job Submission SDK client,
  which talks to a cluster's dashboard over HTTP and starts no Ray task or actor, so that
  `raycompress submit` stays a thin client beside the CLI rather than a Ray shell;
- `sweep/` and `report/` in one direction: `report` may read the sweep's data types, `sweep`
  imports nothing from `report` (nor from `distributed`, which runs it);
- `algorithms/` is pure tensor maths: torch, the standard library, itself and `finite`;
- `models/` does not borrow from `algorithms/`; `finite` (their shared NaN/Inf check) imports
  only torch.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "system" / "raycompress"
RAY_ALLOWED = ("distributed/", "submit.py")


def _imports() -> dict[str, list[tuple[str, int]]]:
    """file (relative to the package, '/'-separated) -> [(imported module, line)]."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((node.module, node.lineno))
        out[rel] = found
    return out


IMPORTS = _imports()


def _offending(files: str | tuple[str, ...], bad) -> list[str]:
    return [f"{rel}:{line} imports {mod}" for rel, mods in IMPORTS.items() if rel.startswith(files)
            for mod, line in mods if bad(mod)]


def _is(mod: str, *names: str) -> bool:
    return any(mod == n or mod.startswith(n + ".") for n in names)


def test_the_package_is_found():
    assert len(IMPORTS) > 50 and "distributed/orchestrator.py" in IMPORTS and "cli.py" in IMPORTS


def test_ray_is_imported_only_in_distributed():
    outside = tuple(rel for rel in IMPORTS if not rel.startswith(RAY_ALLOWED))
    assert _offending(outside, lambda m: _is(m, "ray")) == []
    assert _offending("distributed/", lambda m: _is(m, "ray")), "the check sees Ray imports where they are"


def test_sweep_does_not_import_report_or_distributed():
    assert _offending("sweep/", lambda m: _is(m, "raycompress.report", "raycompress.distributed")) == []


def test_algorithms_import_only_torch_and_the_standard_library():
    def bad(mod: str) -> bool:
        top = mod.split(".")[0]
        if top == "raycompress":
            return not _is(mod, "raycompress.algorithms", "raycompress.finite")
        return top not in sys.stdlib_module_names and top not in ("torch", "__future__")

    assert _offending("algorithms/", bad) == []


def test_models_do_not_borrow_from_algorithms_and_finite_is_a_leaf():
    # one exception: the checkpoint format maps compressed-tensors' arguments onto the quantization
    # grid (`algorithms.quant.QuantSpec`), which is defined once, beside its rounding maths
    grid = "models/quantized.py"
    assert [o for o in _offending("models/", lambda m: _is(m, "raycompress.algorithms"))
            if not (o.startswith(grid + ":") and o.endswith("imports raycompress.algorithms.quant"))] == []
    assert _offending("finite.py", lambda m: m.split(".")[0] not in ("torch", "__future__")) == []

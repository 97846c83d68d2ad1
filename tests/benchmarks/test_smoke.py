"""Every benchmark under jobs/benchmarks runs in its `--smoke` mode (tiny random model, fewest
tokens, one point) as a user types it, in a work folder of the test's own, and prints ONE JSON line
with the benchmark's keys. A benchmark that cannot run here (no `.venv-peer`, no CUDA device) must
say so in that line, naming what is missing; the test checks the reason instead of passing silently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "jobs" / "benchmarks"
PEER = REPO / ".venv-peer" / "bin" / "python"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One model cache for every benchmark: the random tiny Llama is built once."""
    return tmp_path_factory.mktemp("bench-cache")


def smoke(name: str, folder_flag: str, work: Path, cache: Path, timeout: float = 600) -> dict:
    """`python jobs/benchmarks/NAME.py --smoke FOLDER_FLAG WORK`; its one JSON line (the last line
    of stdout), after checking it exited 0."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAYCOMPRESS_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke", folder_flag, str(work)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} --smoke exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{name} --smoke printed nothing:\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def test_benchmarks_have_a_smoke_mode():
    """Every benchmark script (not the `_` helpers) is covered below, so none can rot unseen."""
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(COVERED), f"benchmarks without a smoke test: {sorted(scripts - set(COVERED))}"


def test_compression(tmp_path, cache):
    r = smoke("compression", "--output", tmp_path, cache)
    assert r["smoke"] is True and r["calibration"] == {"n": 4, "seq_len": 32}
    a1 = r["scale"]["actors_1"]
    assert _number(a1["stage_wall_s"]) and a1["stage_wall_s"] > 0
    assert set(a1["share"]) == {"stats", "solve", "propagate", "io", "transfer_and_scheduling"}
    assert "skipped" in r["peer"] and "skipped" in r["depth"]
    assert (tmp_path / "scale-1" / "compress" / "compression.json").is_file()  # the work folder is --output


def test_cus_prun(tmp_path, cache):
    r = smoke("cus_prun", "--output", tmp_path, cache)
    run = r["runs"]["0.25"]
    assert run["intermediate_size"] < r["dense"]["intermediate_size"]  # neurons were removed
    assert 0 < run["param_ratio"] < 1 and _number(run["prefill_speedup"]) and _number(run["decode_speedup"])


def test_selection(tmp_path, cache):
    r = smoke("selection", "--output", tmp_path, cache)
    assert r["zipcal_docs_per_s"] > 0
    cov = r["two_round"]["k4"]
    assert cov["windows"] > 4 and cov["single_coverage"] > 0 and cov["two_round_coverage"] > 0
    assert r["two_round_coverage_ratio"] == round(cov["two_round_coverage"] / cov["single_coverage"], 4)
    assert "skipped" in r["perplexity"] and "skipped" in r["synthetic"]


def test_routing_selection(tmp_path, cache):
    r = smoke("routing_selection", "--output", tmp_path, cache)
    assert r["config"]["smoke"] is True and r["config"]["token_budget"] == 4 * 32
    for name in ("routing_aware", "zipcal", "random"):
        assert r[name]["windows"] == 4 and r[name]["experts_reached"] == 16
        assert r[name]["perplexity_after_compression"] is None and r[name]["perplexity_note"]
    assert r["routing_aware"]["starved_experts"] == 0 and r["min_tokens_sweep"] == {"skipped": "--smoke"}


def test_moe(tmp_path, cache):
    r = smoke("moe", "--workdir", tmp_path, cache)
    assert r["smoke"] is True and r["errors"] == [] and r["identical_across_actors"] is True
    run = r["shapes"]["tiny-qwen3-moe"]["runs"]["1"]
    assert run["tokens_per_expert_min"] > 0 and run["seconds_per_layer"] > 0 and r["rss_ratio"] > 0


def test_scale(tmp_path, cache):
    r = smoke("scale", "--workdir", tmp_path, cache)
    assert r["errors"] == [] and r["shape"]["layers"] == 1
    assert r["seconds_per_layer"]["sparsegpt"]["1"] > 0 and r["rss_ratio"] > 0
    assert r["peer"]["skipped"] == "--no-peer"


def test_gpu_check(tmp_path, cache):
    import torch

    r = smoke("gpu_check", "--workdir", tmp_path, cache)
    served = r["serving"]["schemes"]["FP8_DYNAMIC"]  # --smoke serves this one scheme
    if not torch.cuda.is_available():
        assert r["skipped"] == "no CUDA device" and served == {"skipped": "no CUDA device"}
        return
    assert r["errors"] == [] and all(c["pass"] for c in r["correctness"].values())
    assert r["speed"]["sparsegpt"]["seconds_per_layer"] > 0
    if "skipped" in served:  # a GPU without vLLM: part (c) says so
        assert served["skipped"].startswith("vllm is not importable")
    else:
        assert served["loads_in_vllm"] and served["tokens_per_s"] > 0 and served["speedup_vs_bf16"] > 0, served


def test_calibration_sweep(tmp_path, cache):
    r = smoke("calibration_sweep", "--workdir", tmp_path / "work", cache)
    assert r["points"] == 2 and r["seeds"] == [0] and r["best_mix"] == "mix1-1"
    assert set(r["per_point"]) == {"biomed", "mix1-1"}
    assert r["domain_ratio"] > 0 and r["general_ratio"] is None and r["mixcal_general_gain"] is None


def test_sparse_transfer(tmp_path, cache):
    r = smoke("sparse_transfer", "--workdir", tmp_path / "work", cache)
    assert r["sparsity_after"] >= r["sparsity_before"] > 0.4  # the mask held through training
    for key in ("domain", "general"):
        assert r[f"{key}_ppl_dense_trained"] == r["dense_trained"][f"{key}_ppl"] > 0
        assert r[f"{key}_ppl_ratio_vs_dense_trained"] == round(r[f"{key}_ppl_recovered"] / r[f"{key}_ppl_dense_trained"], 4)
        assert f"{key}_recovered_vs_dense_trained" in r
    assert r["dense_trained"]["steps"] == r["steps"] == 2 and r["gmp"] == {"skipped": "--smoke"}


def test_chaos(tmp_path, cache):
    r = smoke("chaos", "--workdir", tmp_path / "work", cache, timeout=900)
    for key in ("hangs", "stale_reuses", "foreign_files_touched", "ports_on_non_loopback", "code_execution_markers",
                "bad_inputs_tried", "bad_inputs_rejected_cleanly"):
        assert _number(r[key]), key
    assert r["bad_inputs_tried"] == 2 and len(r["leaks"]) == 2
    assert r["listening"], "the reference run's listening sockets were not sampled"
    assert {c["case"] for c in r["leaks"]} == {"corpus_truncated", "output_unrelated_folder"}


@pytest.mark.parametrize("name", ["eval_parity", "peer_llmcompressor"])
def test_peer_benchmarks(name, tmp_path, cache):
    r = smoke(name, "--output", tmp_path, cache)
    if not PEER.exists():
        assert ".venv-peer" in r["skipped"] and "make peer-env" in r["skipped"]
        return
    key = "tasks" if name == "eval_parity" else "algorithms"
    assert r[key] and r["smoke"] is True


def test_formats(tmp_path, cache):
    r = smoke("formats", "--output", tmp_path, cache)
    assert r["smoke"] is True and set(r["schemes"]) == {"W8A8-INT8", "FP8_DYNAMIC"}
    assert json.loads((tmp_path / "formats.json").read_text())["schemes"] == r["schemes"]  # the work folder is --output
    for name, s in r["schemes"].items():
        assert "errors" not in s, f"{name}: {s.get('errors')}"
        assert set(s["ppl_ours"]) == {"wikitext2", "biomed_abstracts"} and all(v > 0 for v in s["ppl_ours"].values())
        assert 8 < s["bits_per_weight"]["ours"] < 9.5, name  # 8-bit codes plus per-channel scales
        assert s["bytes_on_disk"]["ours"] > 0 and s["seconds_ours"] > 0 and s["loads_in_transformers"]["ours"] is True
        match = s["eval_matches_stock"]["ours"]
        assert match["value"] is True or (match["value"] is None and match["why"]), f"{name}: {match}"
        if not PEER.exists():
            assert s["ppl_peer"] is None and s["wall_ratio"] is None and "make peer-env" in s["peer_skipped"]
            continue
        assert s["ppl_ratio"] == round(max(s["ppl_ours"][t] / s["ppl_peer"][t] for t in s["ppl_ours"]), 4)
        assert s["wall_ratio"] > 0 and s["loads_in_transformers"]["peer"] is True


COVERED = ("compression", "cus_prun", "selection", "scale", "gpu_check", "calibration_sweep", "sparse_transfer",
           "chaos", "eval_parity", "peer_llmcompressor", "formats", "routing_selection", "moe")

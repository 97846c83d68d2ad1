"""report.expert_summary / plots.expert_tokens_chart on records of a mixture of experts."""
import base64

from raycompress.report.plots import expert_tokens_chart
from raycompress.report.report import compression_summary, expert_summary, layer_summary


def _records():
    fb = {"tokens": 0, "method": "rtn", "reason": "0 routed tokens < min_tokens_per_expert=1"}
    mods = [{"layer": lay, "module": f"mlp.experts.{e}.{r}", "expert": e, "tokens": 3 * e + lay, "sparsity": 0.5,
             "rel_error": 0.1 * (e + 1), **({"fallback": {**fb, "tokens": 0}} if 3 * e + lay == 0 else {})}
            for lay in range(2) for e in range(4) for r in ("gate", "up", "down")]
    mods[0]["tokens"] = mods[1]["tokens"] = mods[2]["tokens"] = 0
    return mods + [{"layer": 0, "module": "self_attn.q_proj", "sparsity": 0.5, "rel_error": 0.2}]


def test_tokens_per_layer_and_expert_fallbacks_and_heat_map():
    s = expert_summary(_records())
    assert s["layers"] == [0, 1] and s["tokens"] == [[0, 3, 6, 9], [1, 4, 7, 10]]
    assert s["tokens_min"] == 0 and s["tokens_max"] == 10
    assert s["fallbacks"] == [{"layer": 0, "expert": 0, "tokens": 0, "method": "rtn",
                               "reason": "0 routed tokens < min_tokens_per_expert=1"}]
    png = base64.b64decode(expert_tokens_chart(s))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert expert_summary([{"layer": 0, "module": "fc1", "sparsity": 0.5}]) is None and expert_tokens_chart(None) is None


def test_layer_summary_collapses_experts_per_role():
    lay0 = layer_summary(_records())[0]
    assert set(lay0["modules"]) == {"mlp.experts.*.gate", "mlp.experts.*.up", "mlp.experts.*.down", "self_attn.q_proj"}
    assert abs(lay0["modules"]["mlp.experts.*.down"]["rel_error"] - 0.25) < 1e-12  # mean of 0.1 .. 0.4
    assert compression_summary({"algorithm": "gptq", "modules": _records()})["experts"]["tokens"][1] == [1, 4, 7, 10]


def test_reports_list_every_fallback_with_its_reason():
    from raycompress.report.markdown import _compression_lines
    from raycompress.report.report import fallback_lines

    s = expert_summary(_records())
    lines = fallback_lines(s)
    assert lines[0].startswith("Mixture of experts: 8 (layer, expert) pairs") and "min 0, max 10; 1 fell back" in lines[0]
    assert lines[1] == "Layer 0 expert 0: 0 routed tokens, solved with rtn (0 routed tokens < min_tokens_per_expert=1)."
    md = "\n".join(_compression_lines(compression_summary({"algorithm": "gptq", "modules": _records()})))
    assert lines[1] in md

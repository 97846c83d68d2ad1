"""report.sweep_stats: known answers for mean ± sd, the Pareto front, the noise test and run figures."""
import math

from raycompress.report import sweep_stats as stats


def _task(domain, kind, metric, value):
    return {"domain": domain, "kind": kind, "primary": metric, "metrics": {metric: value}, "stderr": {}}


def _results(dense_bio, comp_bio, dense_gen, comp_gen):
    def model(bio, gen):
        return {"tasks": {"abstracts": _task("biomed", "perplexity", "word_perplexity", bio),
                          "wiki": _task("general", "perplexity", "word_perplexity", gen)}}
    return {"dense": model(dense_bio, dense_gen), "compressed": model(comp_bio, comp_gen)}


def test_run_figures_retention_and_ppl():
    f = stats.run_figures(_results(20.0, 25.0, 30.0, 40.0), None)
    assert f["domain"] == "biomed" and f["domain_ppl"] == 25.0 and f["general_ppl"] == 40.0
    assert math.isclose(f["retention"]["biomed"], 0.8) and math.isclose(f["retention"]["general"], 0.75)


def test_mean_sd_and_aggregate():
    assert stats.mean_sd([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert stats.mean_sd([4.0, None]) == {"mean": 4.0, "sd": None, "n": 1}
    runs = [stats.run_figures(_results(20.0, b, 30.0, 40.0), None) for b in (25.0, 20.0)]
    a = stats.aggregate(runs)
    assert a["n"] == 2 and a["domain_ppl"]["mean"] == 22.5 and math.isclose(a["domain_ppl"]["sd"], math.sqrt(12.5))
    assert math.isclose(a["retention"]["biomed"]["mean"], 0.9) and a["retention"]["general"]["sd"] == 0.0


def test_pareto_front_and_dominators():
    got = stats.pareto({"a": (1.0, 0.5), "b": (0.5, 1.0), "c": (0.5, 0.5), "d": (1.0, 0.4), "e": (1.0, 0.5)})
    assert got == {"a": [], "b": [], "c": ["a", "b", "e"], "d": ["a", "e"], "e": []}


def test_beyond_noise_is_two_welch_standard_errors():
    a = {"mean": 1.0, "sd": 0.1, "n": 4}
    se = math.sqrt(0.1 ** 2 / 4 + 0.1 ** 2 / 4)  # 0.0707
    assert stats.beyond_noise(a, {"mean": 1.0 - 2.1 * se, "sd": 0.1, "n": 4}) is True
    assert stats.beyond_noise(a, {"mean": 1.0 - 1.9 * se, "sd": 0.1, "n": 4}) is False
    assert stats.beyond_noise(a, {"mean": 0.0, "sd": None, "n": 1}) is None


def test_verdicts_and_seed_noise():
    aggs = {"p": {"retention": {"biomed": {"mean": 0.9, "sd": 0.01, "n": 3}}, "domain_ppl": {"mean": 10.0, "sd": 1.0}},
            "q": {"retention": {"biomed": {"mean": 0.89, "sd": 0.01, "n": 3}}, "domain_ppl": {"mean": 20.0, "sd": 1.0}},
            "r": {"retention": {"biomed": {"mean": 0.5, "sd": 0.01, "n": 3}}, "domain_ppl": {"mean": 5.0, "sd": None}}}
    assert stats.verdicts(aggs, "biomed") == {"best": "p", "beaten": ["r"], "within": ["q"], "unknown": []}
    assert math.isclose(stats.seed_noise(aggs, "domain_ppl"), (0.1 + 0.05) / 2)

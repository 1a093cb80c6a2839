"""Replay/OPE reports: bootstrap intervals, the paired test, and what the HTML page holds."""

import re

import numpy as np

from replay.protocols import ModelResult, _over_time
from replay.report import html_report, ope_report, results_json, uncertainty
from replay.stats import mean_ci, paired_difference


def test_mean_interval_covers_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small = mean_ci(rng.binomial(1, 0.3, 200), n_boot=500)
    large = mean_ci(rng.binomial(1, 0.3, 20_000), n_boot=500)
    assert small.ci_low < small.value < small.ci_high
    assert large.covers(0.3) and large.ci_high - large.ci_low < (small.ci_high - small.ci_low) / 5


def test_paired_difference_tells_better_from_tied():
    rng = np.random.default_rng(2)
    base = rng.binomial(1, 0.2, 5000).astype(float)
    better = np.maximum(base, rng.binomial(1, 0.1, 5000))  # wins some queries, loses none
    test = paired_difference(better, base, n_boot=500)
    assert test.difference > 0 and test.ci_low > 0 and test.p_value <= 0.01
    tie = paired_difference(base, base.copy(), n_boot=500)
    assert tie.difference == 0 and tie.p_value == 1.0


def _result(name: str, hit_rate: float, n: int = 3000, seed: int = 0) -> ModelResult:
    rng = np.random.default_rng(seed)
    hits = rng.binomial(1, hit_rate, n).astype(float)
    per_query = {"HR@20": hits, "MRR@20": hits / 3, "NDCG@10": hits / 2}
    result = ModelResult(name, {k: float(v.mean()) for k, v in per_query.items()}
                         | {"HR@10": float(hits.mean()), "coverage": 0.4, "ILD": 0.7,
                            "head_share": 0.5, "exposure_gini": 0.6, "events_per_s": 1e5,
                            "predictions_per_s": 1e4})
    result.per_query = per_query
    result.over_time = _over_time(per_query, list(range(n)), 10, 20)
    result.popularity_deciles = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0, 0, 0, 0]
    return result


def test_models_are_tested_against_the_best_reference_on_the_same_queries():
    results = [_result("a_long_model_name_blend", 0.4, seed=1), _result("popularity", 0.2),
               _result("itemknn", 0.25, seed=3), _result("random", 0.01, seed=4)]
    unc = uncertainty(results, 20, n_boot=300)
    assert unc.baseline == "itemknn"
    doc = results_json(results, {"protocol": "user"}, unc)
    blend = doc["a_long_model_name_blend"]
    assert blend["vs_baseline"]["baseline"] == "itemknn" and blend["vs_baseline"]["ci_low"] > 0
    low, high = blend["ci95"]["HR@20"]
    assert low < blend["HR@20"] < high
    assert "vs_baseline" not in doc["itemknn"] and doc["random"]["vs_baseline"]["ci_high"] < 0


def test_html_report_has_every_chart_full_names_and_the_settings_without_scripts():
    results = [_result("a_long_model_name_blend", 0.4, seed=1), _result("popularity", 0.2)]
    unc = uncertainty(results, 20, n_boot=200)
    page = html_report(results, {"protocol": "user", "warmup": 0.1}, unc)
    charts = re.findall(r'data-chart="([^"]+)"', page)
    assert charts == ["interval-HR@20", "interval-MRR@20", "time-HR@20", "time-MRR@20",
                      "popularity-deciles", "beyond-accuracy"]
    assert page.count("<svg") == len(charts) and "<script" not in page
    # names are SVG text (searchable, never cut to "a_long_mod")
    assert re.search(r"<text[^>]*>a_long_model_name_blend</text>", page)
    assert "<th scope=\"row\">warmup</th><td>0.1</td>" in page
    assert 'class="better"' in page  # the blend beats popularity with 95 % confidence


def test_ope_report_marks_estimates_whose_interval_misses_the_observed_value():
    check = {"campaign": "all", "rounds_random": 100, "rounds_bts": 100,
             "random_observed_ctr": 0.004,
             "bts_observed_ctr": {"value": 0.005, "ci_low": 0.004, "ci_high": 0.006}}
    for key, value in (("ips", 0.0052), ("snips", 0.0051), ("dr", 0.02)):
        check[key] = {"value": value, "ci_low": value - 0.001, "ci_high": value + 0.001,
                      "relative_error": abs(value - 0.005) / 0.005,
                      "covers_observed": value - 0.001 <= 0.005 <= value + 0.001}
    page = ope_report([check], {"seed": 0})
    assert page.count("<svg") == 1
    assert re.search(r'data-estimator="dr">.*?class="worse">no<', page)
    assert re.search(r'data-estimator="ips">.*?class="better">yes<', page)

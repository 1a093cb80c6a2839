"""Replay and OPE reports render their charts in a real browser (shared data slices)."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from replay.loaders import load_split
from replay.ope import open_bandit_check
from replay.protocols import run
from replay.report import ope_report, write_outputs
from tests.browser.conftest import console_errors, screenshot
from tests.conftest import SHARED_DATA

YOOCHOOSE = SHARED_DATA / "yoochoose-rsc15-100k" / "yoochoose-clicks-100k_train_full.txt"
OPEN_BANDIT = SHARED_DATA / "open-bandit-sample"


def _charts(driver) -> dict[str, tuple[int, int]]:
    return {figure.get_attribute("data-chart"): (svg.size["width"], svg.size["height"])
            for figure in driver.find_elements(By.CSS_SELECTOR, "figure.chart")
            for svg in figure.find_elements(By.TAG_NAME, "svg")}


@pytest.mark.skipif(not YOOCHOOSE.exists(), reason="../shared/data absent (outside the team)")
def test_replay_report_renders_every_chart_with_whole_model_names(tmp_path, browser):
    sample = tmp_path / "slice.txt"
    sample.write_text("\n".join(YOOCHOOSE.read_text().splitlines()[:6001]) + "\n")
    train, test = load_split(sample, "yoochoose", 1.0)
    results = run("session", train, test, ["session", "itemknn", "popularity"], progress=False)
    page = tmp_path / "report.html"
    write_outputs(results, {"protocol": "session", "data": str(sample)}, tmp_path / "r.json",
                  page, n_boot=200)
    browser.get(page.as_uri())
    charts = _charts(browser)
    assert set(charts) == {"interval-HR@20", "interval-MRR@20", "time-HR@20", "time-MRR@20",
                           "popularity-deciles", "beyond-accuracy"}
    assert all(width > 300 and height > 100 for width, height in charts.values()), charts
    legend = browser.find_element(By.CSS_SELECTOR, 'figure[data-chart="time-HR@20"]').text
    assert {"session", "itemknn", "popularity"} <= set(legend.split())
    rows = browser.find_elements(By.CSS_SELECTOR, "table.metrics tr[data-model]")
    assert [r.get_attribute("data-model") for r in rows][0] == "session"
    assert "[" in rows[0].text  # intervals shown
    assert console_errors(browser) == []
    screenshot(browser, "replay-report")


@pytest.mark.skipif(not OPEN_BANDIT.exists(), reason="../shared/data absent (outside the team)")
def test_ope_report_renders(tmp_path, browser):
    page = tmp_path / "ope.html"
    page.write_text(ope_report([open_bandit_check(OPEN_BANDIT, "all", n_boot=200)],
                               {"data": str(OPEN_BANDIT)}))
    browser.get(page.as_uri())
    assert list(_charts(browser)) == ["ope-all"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr[data-estimator]")) == 3
    assert console_errors(browser) == []
    screenshot(browser, "ope-report")

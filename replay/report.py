"""Replay outputs: the machine-readable JSON, a Markdown table, and a self-contained HTML report.

The report gives each model's accuracy with a bootstrap 95 % interval, a paired test of every
model against the best reference model of the run (popularity, trending, item-kNN, random) on
the same queries, accuracy over the log with per-window intervals, where recommendations fall
in the popularity deciles, coverage and diversity, and the run's settings. Charts are
matplotlib SVG inlined in the page: no script, no network, text that can be searched.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from replay.protocols import ModelResult
from replay.stats import Estimate, PairedDifference, mean_ci, paired_difference

TABLE_COLUMNS = ("HR@20", "MRR@20", "HR@10", "MRR@10", "NDCG@10", "coverage", "ILD",
                 "head_share", "exposure_gini", "events_per_s", "predictions_per_s")
#: The models every other one is tested against: the best of those in the run.
REFERENCE_MODELS = ("popularity", "trending", "itemknn", "random")
BEYOND_ACCURACY = (("coverage", "catalogue coverage"), ("ILD", "intra-list diversity"),
                   ("head_share", "share from the 20 % most popular items"))


@dataclass
class Uncertainty:
    """Intervals per model and metric; each model against ``baseline`` on ``metric``."""

    metric: str
    intervals: dict[str, dict[str, Estimate]]
    baseline: str | None
    versus: dict[str, PairedDifference]


def uncertainty(results: Sequence[ModelResult], k: int, n_boot: int = 1000,
                seed: int = 0) -> Uncertainty:
    metric = f"HR@{k}"
    names = (metric, f"MRR@{k}", "NDCG@10")
    scored = [r for r in results if metric in r.per_query and len(r.per_query[metric])]
    intervals = {r.name: {m: mean_ci(r.per_query[m], n_boot, seed) for m in names
                          if m in r.per_query} for r in scored}
    references = [r for r in scored if r.name in REFERENCE_MODELS]
    baseline = max(references, key=lambda r: r.metrics.get(metric, 0.0), default=None)
    versus = {}
    if baseline is not None:
        for r in scored:
            if r is not baseline and len(r.per_query[metric]) == len(baseline.per_query[metric]):
                versus[r.name] = paired_difference(r.per_query[metric],
                                                   baseline.per_query[metric], n_boot, seed)
    return Uncertainty(metric, intervals, baseline.name if baseline else None, versus)


def _cutoff(results: Sequence[ModelResult]) -> int:
    return max((int(key.split("@")[1]) for r in results for key in r.metrics
                if key.startswith("HR@") and key.split("@")[1].isdigit()), default=20)


def results_json(results: Sequence[ModelResult], meta: dict,
                 unc: Uncertainty | None = None) -> dict:
    """One object per model name with its metrics (the ``--out`` contract), its 95 %
    intervals (``ci95``) and its paired test against the best reference (``vs_baseline``),
    plus ``_meta``."""
    doc = {}
    for r in results:
        entry = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.metrics.items()}
        if unc is not None and r.name in unc.intervals:
            entry["ci95"] = {m: [round(e.ci_low, 6), round(e.ci_high, 6)]
                             for m, e in unc.intervals[r.name].items()}
        if unc is not None and r.name in unc.versus:
            test = unc.versus[r.name]
            entry["vs_baseline"] = {"baseline": unc.baseline, "metric": unc.metric,
                                    **{k: round(v, 6) for k, v in asdict(test).items()}}
        doc[r.name] = entry
    doc["_meta"] = meta
    return doc


def markdown_table(results: Sequence[ModelResult]) -> str:
    head = "| model | " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|---|" + "---|" * len(TABLE_COLUMNS)
    rows = []
    for r in results:
        cells = []
        for column in TABLE_COLUMNS:
            value = r.metrics.get(column, float("nan"))
            cells.append(f"{value:,.0f}" if column.endswith("_per_s") else f"{value:.3f}")
        rows.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


# --- charts -----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 10, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _colours(results: Sequence[ModelResult]) -> dict[str, str]:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {r.name: cycle[n % len(cycle)] for n, r in enumerate(results)}


def _svg(fig, name: str) -> str:
    """The figure as an inline ``<svg>`` (ids salted with ``name``: many charts, one page)."""
    plt = _pyplot()
    with plt.rc_context({"svg.hashsalt": name}):
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buffer.getvalue()
    return f'<figure class="chart" data-chart="{html.escape(name)}">' + svg[svg.index("<svg"):] \
        + "</figure>"


def _interval_dot(ax, y: float, value: float, low: float, high: float, colour: str) -> None:
    """A point with its interval as whiskers, at height ``y``."""
    ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", capsize=4,
                color=colour)


def _interval_chart(results: Sequence[ModelResult], unc: Uncertainty, metric: str) -> str:
    rows = sorted(((name, est[metric]) for name, est in unc.intervals.items() if metric in est),
                  key=lambda row: row[1].value)
    if not rows:
        return "<p>no scored queries</p>"
    plt, colours = _pyplot(), _colours(results)
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(rows) + 1.0))
    for y, (name, est) in enumerate(rows):
        _interval_dot(ax, y, est.value, est.ci_low, est.ci_high, colours[name])
    if unc.baseline in unc.intervals and metric in unc.intervals[unc.baseline]:
        ax.axvline(unc.intervals[unc.baseline][metric].value, color="#888", linestyle="--",
                   linewidth=1, label=f"best reference: {unc.baseline}")
        ax.legend(loc="lower right", frameon=False)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlabel(f"{metric} (mean over scored queries, 95 % bootstrap interval)")
    ax.set_xlim(left=0)
    return _svg(fig, f"interval-{metric}")


def _over_time_chart(results: Sequence[ModelResult], metric: str) -> str:
    series = [r for r in results if r.over_time and metric in r.over_time[0]]
    if not series:
        return "<p>no data</p>"
    plt, colours = _pyplot(), _colours(results)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for r in series:
        x = np.array([w["position"] for w in r.over_time])
        y = np.array([w[metric] for w in r.over_time])
        half = np.array([w.get(f"{metric}_ci", 0.0) for w in r.over_time])
        ax.plot(x, y, color=colours[r.name], linewidth=1.6, label=r.name)
        ax.fill_between(x, y - half, y + half, color=colours[r.name], alpha=0.15, linewidth=0)
    ax.set_xlabel("position in the log (events; each point is one window of scored queries)")
    ax.set_ylabel(metric)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _svg(fig, f"time-{metric}")


def _decile_heatmap(results: Sequence[ModelResult]) -> str:
    rows = [r for r in results if r.popularity_deciles]
    if not rows:
        return "<p>no data</p>"
    plt = _pyplot()
    shares = np.array([r.popularity_deciles for r in rows]) * 100
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.2))
    image = ax.imshow(shares, cmap="Blues", aspect="auto", vmin=0, vmax=max(shares.max(), 1))
    for (y, x), share in np.ndenumerate(shares):
        ax.text(x, y, f"{share:.0f}", ha="center", va="center", fontsize=8,
                color="white" if share > shares.max() * 0.6 else "#223")
    ax.set_yticks(range(len(rows)), [r.name for r in rows])
    ax.set_xticks(range(shares.shape[1]))
    ax.set_xlabel("popularity decile of recommended items (0 = the most popular 10 % of items)")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="% of recommendations", fraction=0.04)
    return _svg(fig, "popularity-deciles")


def _beyond_accuracy_chart(results: Sequence[ModelResult]) -> str:
    plt, colours = _pyplot(), _colours(results)
    names = [r.name for r in results]
    fig, axes = plt.subplots(1, len(BEYOND_ACCURACY), figsize=(10, 0.38 * len(names) + 1.2),
                             sharey=True)
    for ax, (metric, label) in zip(axes, BEYOND_ACCURACY):
        values = [r.metrics.get(metric, 0.0) for r in results]
        ax.barh(range(len(names)), values, color=[colours[n] for n in names])
        ax.set_title(label, fontsize=10)
        ax.set_xlim(0, max(max(values, default=0) * 1.1, 1e-9))
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    return _svg(fig, "beyond-accuracy")


# --- page -------------------------------------------------------------------------------------
def _cell(value: float, column: str) -> str:
    return f"{value:,.0f}" if column.endswith("_per_s") else f"{value:.3f}"


def _with_interval(value: float, low: float, high: float, fmt: str = ".4f",
                   note: str = "") -> str:
    """``value [low, high]note`` as table-cell HTML, the interval (and note) small."""
    return f"{value:{fmt}} <small>[{low:{fmt}}, {high:{fmt}}]{note}</small>"


def _interval_cell(est: Estimate | None, value: float) -> str:
    if est is None:
        return f"<td>{value:.4f}</td>"
    return f"<td>{_with_interval(est.value, est.ci_low, est.ci_high)}</td>"


def _versus_cell(test: PairedDifference | None) -> str:
    if test is None:
        return "<td>—</td>"
    p = "p < 0.001" if test.p_value <= 0.001 else f"p = {test.p_value:.3f}"
    sign = "better" if test.ci_low > 0 else "worse" if test.ci_high < 0 else "tie"
    cell = _with_interval(test.difference, test.ci_low, test.ci_high, "+.4f", f", {p}")
    return f'<td class="{sign}">{cell}</td>'


def _metrics_table(results: Sequence[ModelResult], unc: Uncertainty, k: int) -> str:
    accuracy = (f"HR@{k}", f"MRR@{k}", "NDCG@10")
    rest = ("HR@10_cold", "coverage", "ILD", "head_share", "exposure_gini", "events_per_s",
            "predictions_per_s")
    rest = tuple(c for c in rest if any(c in r.metrics for r in results))
    head = "".join(f"<th>{html.escape(c)} <small>[95 % CI]</small></th>" for c in accuracy)
    head += (f"<th>Δ {html.escape(unc.metric)} vs {html.escape(unc.baseline or '—')} "
             f"<small>[95 % CI], paired</small></th>")
    head += "".join(f"<th>{html.escape(c)}</th>" for c in rest)
    body = []
    for r in sorted(results, key=lambda r: -r.metrics.get(unc.metric, 0.0)):
        est = unc.intervals.get(r.name, {})
        cells = "".join(_interval_cell(est.get(c), r.metrics.get(c, float("nan")))
                        for c in accuracy)
        cells += _versus_cell(unc.versus.get(r.name))
        cells += "".join(f"<td>{_cell(r.metrics.get(c, float('nan')), c)}</td>" for c in rest)
        body.append(f'<tr data-model="{html.escape(r.name)}"><th scope="row">'
                    f"{html.escape(r.name)}</th>{cells}</tr>")
    return (f'<div class="wide"><table class="metrics"><tr><th>model</th>{head}</tr>'
            f'{"".join(body)}</table></div>')


def settings_table(meta: dict) -> str:
    rows = "".join(f"<tr><th scope=\"row\">{html.escape(str(key))}</th>"
                   f"<td>{html.escape(json.dumps(value) if isinstance(value, (dict, list)) else str(value))}</td></tr>"
                   for key, value in meta.items())
    return f'<table class="settings">{rows}</table>'


PAGE_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;
color:#1d2430;padding:0 1em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #dde3ea;padding:4px 8px;text-align:right;font-variant-numeric:tabular-nums}
th[scope=row]{text-align:left}.settings td{text-align:left}small{color:#667085}
td.better{background:#e7f6ea}td.worse{background:#fdecea}figure.chart{margin:0 0 1.5em}
figure.chart svg{max-width:100%;height:auto}.wide{overflow-x:auto}
.metrics small{white-space:nowrap}"""


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A self-contained HTML page: a title and (heading, HTML) sections."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")


def html_report(results: Sequence[ModelResult], meta: dict, unc: Uncertainty) -> str:
    k = _cutoff(results)
    note = ("<p>Intervals: percentile bootstrap over scored queries "
            f"({meta.get('bootstrap', 1000)} resamples). Δ: the model minus the best reference "
            "model of the run on the same queries (paired bootstrap; green: better with 95 % "
            "confidence, red: worse). Over time: each window's mean with its 95 % normal "
            "interval.</p>")
    return page("streamrec replay", [
        ("Run", settings_table(meta)),
        ("Accuracy", _metrics_table(results, unc, k) + note
         + _interval_chart(results, unc, f"HR@{k}") + _interval_chart(results, unc, f"MRR@{k}")),
        (f"HR@{k} over the log", _over_time_chart(results, f"HR@{k}")),
        (f"MRR@{k} over the log", _over_time_chart(results, f"MRR@{k}")),
        ("Popularity bias", _decile_heatmap(results)),
        ("Coverage and diversity", _beyond_accuracy_chart(results)
         + "<p>Coverage: share of the catalogue ever recommended. ILD: 1 − mean pairwise "
           "co-occurrence cosine within a list. Head share: recommendations from the most "
           "popular 20 % of items.</p>")])


ESTIMATORS = (("ips", "IPS"), ("snips", "SNIPS"), ("dr", "DR"))


def _ope_chart(check: dict) -> str:
    """Each estimate with its interval beside the observed value and its interval."""
    plt = _pyplot()
    observed = check["bts_observed_ctr"]
    fig, ax = plt.subplots(figsize=(7, 2.4))
    ax.axvspan(observed["ci_low"], observed["ci_high"], color="#2ca02c", alpha=0.15,
               label="observed CTR of the target policy (95 % CI)")
    ax.axvline(observed["value"], color="#2ca02c", linewidth=1.2)
    for y, (key, _) in enumerate(ESTIMATORS):
        _interval_dot(ax, y, *_interval_of(check[key]), "#1f77b4")
    ax.set_yticks(range(len(ESTIMATORS)), [label for _, label in ESTIMATORS])
    ax.set_xlabel("click-through rate")
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.3), frameon=False)
    return _svg(fig, f"ope-{check['campaign']}")


def _interval_of(estimate: dict) -> tuple[float, float, float]:
    return estimate["value"], estimate["ci_low"], estimate["ci_high"]


def ope_report(checks: Sequence[dict], meta: dict) -> str:
    """The off-policy check as a page: per campaign, IPS/SNIPS/DR estimates of the target
    policy's CTR with 95 % intervals against the CTR observed when it ran."""
    sections = [("Run", settings_table(meta))]
    for check in checks:
        observed = check["bts_observed_ctr"]
        rows = "".join(
            f'<tr data-estimator="{key}"><th scope="row">{label}</th>'
            f'<td>{_with_interval(*_interval_of(check[key]), ".5f")}</td>'
            f'<td>{check[key]["relative_error"]:.1%}</td>'
            f'<td class="{"better" if check[key]["covers_observed"] else "worse"}">'
            f'{"yes" if check[key]["covers_observed"] else "no"}</td></tr>'
            for key, label in ESTIMATORS)
        table = ('<table class="metrics"><tr><th>estimator</th><th>estimated CTR <small>[95 % '
                 "CI]</small></th><th>relative error</th><th>interval covers the observed"
                 f'</th></tr><tr><th scope="row">observed</th>'
                 f'<td>{_with_interval(*_interval_of(observed), ".5f")}</td>'
                 f"<td>—</td><td>—</td></tr>{rows}</table>")
        text = (f"<p>{check['rounds_random']:,} rounds of the uniform-random log estimate the "
                f"Bernoulli-TS policy, observed over {check['rounds_bts']:,} rounds of its own "
                f"log (random log's CTR {check['random_observed_ctr']:.5f}).</p>")
        sections.append((f"Campaign {check['campaign']}", text + table + _ope_chart(check)))
    return page("streamrec off-policy evaluation", sections)


def write_outputs(results: Sequence[ModelResult], meta: dict, out: str | Path,
                  html_path: str | Path | None, n_boot: int = 1000, seed: int = 0) -> None:
    unc = uncertainty(results, _cutoff(results), n_boot, seed)
    meta = {**meta, "bootstrap": n_boot, "baseline": unc.baseline}
    for path in filter(None, (out, html_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results_json(results, meta, unc), indent=2) + "\n")
    if html_path:
        Path(html_path).write_text(html_report(results, meta, unc))

"""Replay outputs: the machine-readable JSON, a Markdown table, and a self-contained HTML report
(inline SVG plots: metrics over time, where recommendations fall in the popularity deciles)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from replay.protocols import ModelResult

TABLE_COLUMNS = ("HR@20", "MRR@20", "HR@10", "MRR@10", "NDCG@10", "coverage", "ILD",
                 "head_share", "exposure_gini", "events_per_s", "predictions_per_s")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f")


def results_json(results: Sequence[ModelResult], meta: dict) -> dict:
    """One object per model name with its metrics (the ``--out`` contract), plus ``_meta``."""
    doc = {r.name: {k: (round(v, 6) if isinstance(v, float) else v)
                    for k, v in r.metrics.items()} for r in results}
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


def _line_chart(results: Sequence[ModelResult], metric: str, width=640, height=260) -> str:
    series = [(r.name, [(p["position"], p[metric]) for p in r.over_time]) for r in results
              if r.over_time and metric in r.over_time[0]]
    points = [pt for _, s in series for pt in s]
    if not points:
        return "<p>no data</p>"
    x_max = max(x for x, _ in points) or 1
    y_max = max(y for _, y in points) or 1
    pad = 40

    def sx(x):
        return pad + (width - 2 * pad) * x / x_max

    def sy(y):
        return height - pad - (height - 2 * pad) * y / y_max

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
             f'font-size="11">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
             f'stroke="#444"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
             f'stroke="#444"/>',
             f'<text x="{pad}" y="{pad - 8}">{html.escape(metric)} (max {y_max:.3f})</text>',
             f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">event position '
             f'(max {x_max:,})</text>']
    for n, (name, s) in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{path}"/>')
        parts.append(f'<text x="{width - pad + 4}" y="{pad + 14 * n}" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _decile_bars(results: Sequence[ModelResult], width=640, height=240) -> str:
    pad, groups = 40, 10
    slot = (width - 2 * pad) / groups
    bar = slot / (len(results) + 1)
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
             f'font-size="11">']
    for n, r in enumerate(results):
        colour = PALETTE[n % len(PALETTE)]
        for d, share in enumerate(r.popularity_deciles):
            h = (height - 2 * pad) * share
            x = pad + d * slot + n * bar
            parts.append(f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{html.escape(r.name)} '
                         f'decile {d}: {share:.1%}</title></rect>')
        parts.append(f'<text x="{width - pad}" y="{pad + 14 * n}" fill="{colour}" '
                     f'text-anchor="end">{html.escape(r.name)}</text>')
    for d in range(groups):
        parts.append(f'<text x="{pad + d * slot + slot / 2:.1f}" y="{height - pad + 14}" '
                     f'text-anchor="middle">{d}</text>')
    parts.append(f'<text x="{pad}" y="{height - 6}">popularity decile of recommended items '
                 f'(0 = most popular 10 % of the catalogue)</text></svg>')
    return "".join(parts)


def html_report(results: Sequence[ModelResult], meta: dict) -> str:
    rows = "".join(
        "<tr><td>" + html.escape(r.name) + "</td>" + "".join(
            f"<td>{r.metrics.get(c, float('nan')):,.0f}</td>" if c.endswith("_per_s")
            else f"<td>{r.metrics.get(c, float('nan')):.3f}</td>" for c in TABLE_COLUMNS)
        + "</tr>" for r in results)
    header = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    k = max((int(key.split("@")[1]) for r in results for key in r.metrics if "@" in key),
            default=20)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>streamrec replay</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
</style></head><body>
<h1>streamrec replay</h1>
<pre>{html.escape(json.dumps(meta, indent=2))}</pre>
<h2>Metrics</h2><table><tr><th>model</th>{header}</tr>{rows}</table>
<h2>HR@{k} over time</h2>{_line_chart(results, f"HR@{k}")}
<h2>MRR@{k} over time</h2>{_line_chart(results, f"MRR@{k}")}
<h2>Popularity bias</h2>{_decile_bars(results)}
<p>Accuracy: HR, MRR, NDCG, precision, recall, MAP at K. Beyond accuracy: coverage (share of
the catalogue ever recommended), ILD (intra-list diversity from session co-occurrence),
head_share (share of recommendations from the most popular 20 % of items), exposure Gini.</p>
</body></html>"""


def write_outputs(results: Sequence[ModelResult], meta: dict, out: str | Path,
                  html_path: str | Path | None) -> None:
    for path in filter(None, (out, html_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results_json(results, meta), indent=2) + "\n")
    if html_path:
        Path(html_path).write_text(html_report(results, meta))

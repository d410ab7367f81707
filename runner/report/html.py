"""One self-contained HTML page per report: the table, every plot inlined as a PNG data URI, and the
notes saying how it was made (aggregation, runs, commits, the command). No scripts, no external files:
it opens from disk, from an MLflow artifact view or an e-mail attachment."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

# A wide table fits: headers wrap, a number only before its ± ("93.47" over "± 0.52"); one still wider than
# the window scrolls inside its box, its first column (the row labels) staying in view; printed, it shrinks.
STYLE = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222}
.table{overflow-x:auto;max-width:100%;margin:1em 0}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 8px;border-bottom:1px solid #ddd}
th{background:#f4f4f4;text-align:left;vertical-align:bottom;max-width:9em}td{background:#fff}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{position:sticky;left:0;z-index:1}
figure{margin:1.5em 0}img{max-width:100%}figcaption,.notes{color:#555;font-size:13px}code{background:#f4f4f4}
@media print{.table{overflow:visible}table{font-size:8px}th,td{padding:2px 4px}}"""


PLOT_TITLES = {
    "fusion_gain": "Fusion gain over the best member",
    "pareto_size": "Accuracy against model size",
    "pareto_latency": "Accuracy against latency",
    "reliability": "Reliability diagram",
}


def _cell(text: str, best: bool, numeric: bool) -> str:
    text = html.escape(text)
    if numeric:  # one place to break a number: before its ±
        text = text.replace(" ", "&nbsp;").replace("&nbsp;±", " ±")
    inner = f"<b>{text}</b>" if best else text
    return f'<td class="num">{inner}</td>' if numeric else f"<td>{inner}</td>"


def html_page(
    title: str,
    description: str,
    header: Sequence[str],
    body: Sequence[Sequence[tuple[str, bool]]],
    key_columns: int,
    images: Mapping[str, Path],
    notes: Sequence[str],
    captions: Mapping[str, str] | None = None,
) -> str:
    """The page as a string. `header`/`body`: runner.report.table.grid's; the first `key_columns`
    columns are labels, the rest numbers; `images`: plot name -> PNG file; `captions`: plot name ->
    what it shows, in sentences (the plot's id names its figure element, never its caption)."""
    rows = "\n".join(
        "<tr>" + "".join(_cell(t, b, i >= key_columns) for i, (t, b) in enumerate(line)) + "</tr>" for line in body
    )
    table = (
        '<div class="table"><table id="results"><thead><tr>'
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + f"</tr></thead>\n<tbody>\n{rows}\n</tbody></table></div>"
    )
    figures = "\n".join(
        f'<figure id="{html.escape(name)}"><img alt="{html.escape(PLOT_TITLES.get(name, name))}" src="data:image/png;base64,'
        f'{base64.b64encode(Path(path).read_bytes()).decode()}"><figcaption><b>{html.escape(PLOT_TITLES.get(name, name))}.</b> '
        f"{html.escape((captions or {}).get(name, ''))}</figcaption></figure>"
        for name, path in images.items()
    )
    notes_html = "\n".join(f"<p>{html.escape(n).replace('`', '')}</p>" for n in notes)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        + (f"<p>{html.escape(description)}</p>\n" if description else "")
        + f'{table}\n{figures}\n<div class="notes">{notes_html}</div>\n</body></html>\n'
    )

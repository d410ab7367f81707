"""One self-contained HTML page per report: the table, every plot inlined as a PNG data URI, and the
notes saying how it was made (aggregation, runs, commits, the command). No scripts, no external files:
it opens from disk, from an MLflow artifact view or an e-mail attachment."""
from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #ddd}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.5em 0}img{max-width:100%}figcaption,.notes{color:#555;font-size:13px}code{background:#f4f4f4}"""


def _cell(text: str, best: bool, numeric: bool) -> str:
    inner = f"<b>{html.escape(text)}</b>" if best else html.escape(text)
    return f'<td class="num">{inner}</td>' if numeric else f"<td>{inner}</td>"


def html_page(title: str, description: str, header: Sequence[str], body: Sequence[Sequence[tuple[str, bool]]],
              key_columns: int, images: Mapping[str, Path], notes: Sequence[str]) -> str:
    """The page as a string. `header`/`body`: runner.report.table.grid's; the first `key_columns`
    columns are labels, the rest numbers; `images`: plot name -> PNG file."""
    rows = "\n".join("<tr>" + "".join(_cell(t, b, i >= key_columns) for i, (t, b) in enumerate(line)) + "</tr>"
                     for line in body)
    table = ("<div style=\"overflow-x:auto\"><table id=\"results\"><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
             + f"</tr></thead>\n<tbody>\n{rows}\n</tbody></table></div>")
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(Path(path).read_bytes()).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, path in images.items())
    notes_html = "\n".join(f"<p>{html.escape(n).replace('`', '')}</p>" for n in notes)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            + (f"<p>{html.escape(description)}</p>\n" if description else "")
            + f"{table}\n{figures}\n<div class=\"notes\">{notes_html}</div>\n</body></html>\n")

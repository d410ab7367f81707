"""Group runs by config keys, aggregate metrics over seeds (mean +- std), render Markdown / LaTeX / CSV."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from runner.report.select import resolve_key, resolve_metric

log = logging.getLogger(__name__)

MISSING = "none"  # the value shown for a key a run does not have (e.g. compress=null)
IGNORED_IN_MIX = ("member",)  # params that legitimately differ between the members of one job


@dataclass
class Cell:
    mean: float
    std: float
    n: int
    best: bool = False


@dataclass
class Table:
    """Aggregated results: `cells[row][(col, metric)]`; rows and cols are tuples of raw key values."""

    row_keys: list[str]
    col_keys: list[str]
    metrics: list[str]
    row_values: list[tuple]
    col_values: list[tuple]
    cells: dict[tuple, dict[tuple, Cell]]
    mixed: dict[tuple, list[str]] = field(default_factory=dict)  # group -> params that vary inside it
    identical: list[tuple] = field(default_factory=list)  # groups whose n > 1 runs logged the same numbers

    @property
    def columns(self) -> list[tuple[tuple, str]]:
        return [(c, m) for c in self.col_values for m in self.metrics]


def lower_is_better(metric: str, names: Sequence[str]) -> bool:
    return any(metric == n or metric.endswith("/" + n) for n in names)


def _natural(value: Any) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def order_values(values: list[tuple], labels: Mapping[str, str]) -> list[tuple]:
    """Values named in `labels` first, in its order; the rest in natural order."""
    rank = {k: i for i, k in enumerate(labels)}
    return sorted(values, key=lambda v: ([rank.get(str(x), len(rank)) for x in v], [_natural(x) for x in v]))


POOLED = "all"


def pool_runs(
    df: pd.DataFrame, rows: Sequence[str], metrics: Sequence[str], pool: Mapping[str, Any], keep: Sequence[str] = ()
) -> pd.DataFrame:
    """Runs where `key == value` (or in a list of values) for a `pool` item form one row per value
    whatever their other row keys (but those in `keep`, e.g. the member's model_name): the
    members of a sweep over `fuse=` are the same members in every job (member cache), shown once,
    with identical copies of one member run (same member, same metrics) counted once."""
    for key, value in pool.items():
        column = resolve_key(df, key, "pool")
        values = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        hit = df[column].astype(str).isin(values)
        if not hit.any():
            continue
        kept = {resolve_key(df, k, "pool_by") for k in keep}
        others = [c for c in (resolve_key(df, k, "rows") for k in rows) if c != column and c not in kept]
        pooled = df[hit].copy()
        pooled[others] = POOLED
        # a cached member evaluated again in another job: the same member and test predictions (its timings
        # differ, measured anew), so the first copy stands for all
        quality = [c for c in ("metrics.test/acc", "metrics.test/nll") if c in df]
        same = [
            column,
            *others,
            *sorted(kept),
            *(c for c in ("tags.member",) if c in df),
            *(quality or [resolve_metric(df, m, "metrics") for m in metrics]),
        ]
        pooled = pooled.drop_duplicates(subset=same)
        varying = [
            c
            for c in pooled.columns
            if c.startswith("params.") and c != column and c not in kept and pooled[c].astype(str).nunique() > 1
        ]
        pooled[varying] = POOLED  # the other jobs' settings (fuse.*), by the pool's own definition
        df = pd.concat([df[~hit], pooled], ignore_index=True)
    return df


def aggregate(
    df: pd.DataFrame,
    rows: Sequence[str],
    cols: Sequence[str],
    metrics: Sequence[str],
    aggregate_over: Sequence[str] = ("seed",),
    lower: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
) -> Table:
    """Mean, std (n-1) and count of each metric per (rows x cols) group; best mean per column marked."""
    labels = dict(labels or {})
    for key in aggregate_over:  # a key no selected run has would silently aggregate nothing
        resolve_key(df, key, "aggregate_over")
    row_cols = [resolve_key(df, k, "rows") for k in rows]
    col_cols = [resolve_key(df, k, "cols") for k in cols]
    metric_cols = [resolve_metric(df, m, "metrics") for m in metrics]
    keys = row_cols + col_cols
    data = df.copy()
    if keys:
        data[keys] = data[keys].fillna(MISSING).astype(str)
    data["_row"] = list(zip(*[data[c] for c in row_cols])) if row_cols else [("all",)] * len(data)
    data["_col"] = list(zip(*[data[c] for c in col_cols])) if col_cols else [()] * len(data)

    skip = set(keys) | {f"params.{k}" for k in (*aggregate_over, *IGNORED_IN_MIX)}
    param_cols = [c for c in data.columns if c.startswith("params.") and c not in skip]

    cells: dict[tuple, dict[tuple, Cell]] = {}
    mixed: dict[tuple, list[str]] = {}
    identical: list[tuple] = []
    for (row, col), group in data.groupby(["_row", "_col"], sort=False):
        cells.setdefault(row, {})
        for metric, column in zip(metrics, metric_cols):
            values = group[column].dropna().astype(float)
            std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            cells[row][(col, metric)] = Cell(float(values.mean()) if len(values) else math.nan, std, len(values))
        if len(group) > 1 and metric_cols and all(group[c].astype(str).nunique() == 1 for c in metric_cols):
            identical.append(row + col)  # replicates that are copies, not independent runs (e.g. the same members)
            log.warning(
                "report: group %s has %d runs with identical metrics: copies, not replicates", row + col, len(group)
            )
        varying = [c.removeprefix("params.") for c in param_cols if group[c].astype(str).nunique() > 1]
        if varying:
            mixed[row + col] = varying
            log.warning(
                "report: group %s mixes runs that differ in %s; add them to rows/cols or filter", row + col, varying
            )

    table = Table(
        list(rows),
        list(cols),
        list(metrics),
        order_values(list(cells), labels),
        order_values(list({c for r in cells.values() for c, _ in r}), labels),
        cells,
        mixed,
        identical,
    )
    for col, metric in table.columns:
        means = [
            cells[r][(col, metric)].mean
            for r in table.row_values
            if (col, metric) in cells[r] and not math.isnan(cells[r][(col, metric)].mean)
        ]
        if len(means) < 2:
            continue
        best = min(means) if lower_is_better(metric, lower) else max(means)
        for r in table.row_values:
            cell = cells[r].get((col, metric))
            if cell is not None and cell.mean == best:
                cell.best = True
    return table


# ---- rendering -------------------------------------------------------------------------------


@dataclass
class Style:
    labels: Mapping[str, str] = field(default_factory=dict)  # key, value or metric -> display name
    scale: Mapping[str, float] = field(default_factory=dict)  # metric -> factor (100: percent)
    digits: Mapping[str, int] | int = 3  # metric -> decimals, or one for all
    reference: Mapping[str, Any] | None = None  # {title, values: {row label: value}}


def value_label(key: str, value: Any, style: Style) -> str:
    text = str(value)
    if text in style.labels:
        return str(style.labels[text])
    if key.endswith("_target_") and "." in text:
        return text.rsplit(".", 1)[1]
    return text


def _digits(metric: str, style: Style) -> int:
    return style.digits if isinstance(style.digits, int) else int(style.digits.get(metric, 3))


def format_cell(cell: Cell | None, metric: str, style: Style) -> str:
    if cell is None or math.isnan(cell.mean):
        return "-"
    factor, d = float(style.scale.get(metric, 1.0)), _digits(metric, style)
    mean = f"{cell.mean * factor:.{d}f}"
    return mean if math.isnan(cell.std) or cell.std == 0 else f"{mean} ± {cell.std * factor:.{d}f}"


def grid(table: Table, style: Style) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and body as display strings; each body cell is (text, is_best)."""
    header = [style.labels.get(k, k) for k in table.row_keys] or [""]
    for col, metric in table.columns:
        name = style.labels.get(metric, metric)
        prefix = " ".join(value_label(k, v, style) for k, v in zip(table.col_keys, col))
        header.append(f"{prefix} {name}".strip())
    ref = style.reference or None
    if ref:
        header.append(str(ref.get("title", "reference")))
    header.append("n")
    body = []
    for row in table.row_values:
        labels = [value_label(k, v, style) for k, v in zip(table.row_keys, row)] or ["all"]
        line = [(x, False) for x in labels]
        cells = [table.cells[row].get(c) for c in table.columns]
        line += [(format_cell(cell, m, style), bool(cell and cell.best)) for cell, (_, m) in zip(cells, table.columns)]
        if ref:
            values = ref.get("values") or {}
            line.append((str(values.get(" ".join(labels), values.get(str(row[0]) if row else "", "-"))), False))
        counts = sorted({c.n for c in cells if c is not None})
        line.append((str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}", False))
        body.append(line)
    return header, body


def to_markdown(table: Table, style: Style) -> str:
    header, body = grid(table, style)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join(":--" if i < max(1, len(table.row_keys)) else "--:" for i in range(len(header))) + "|",
    ]
    for line in body:
        lines.append("| " + " | ".join(f"**{esc(t)}**" if b else esc(t) for t, b in line) + " |")
    return "\n".join(lines)


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return re.sub(r"[\\&%$#_{}~^]", lambda m: _TEX[m.group()], text).replace("±", r"$\pm$")


def to_latex(table: Table, style: Style, caption: str = "", label: str = "") -> str:
    header, body = grid(table, style)
    n_key = max(1, len(table.row_keys))
    spec = "l" * n_key + "r" * (len(header) - n_key)
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{tex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for line in body:
        lines.append(" & ".join(rf"\textbf{{{tex_escape(t)}}}" if b else tex_escape(t) for t, b in line) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def to_frame(table: Table, style: Style) -> pd.DataFrame:
    """Long format for CSV: one line per (row, col, metric) with raw mean, std, n and best."""
    records = []
    for row in table.row_values:
        for col, metric in table.columns:
            cell = table.cells[row].get((col, metric))
            if cell is None:
                continue
            records.append(
                {
                    **{k: value_label(k, v, style) for k, v in zip(table.row_keys, row)},
                    **{k: value_label(k, v, style) for k, v in zip(table.col_keys, col)},
                    "metric": metric,
                    "mean": cell.mean,
                    "std": cell.std,
                    "n": cell.n,
                    "best": cell.best,
                }
            )
    return pd.DataFrame(records)

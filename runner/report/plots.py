"""Report figures from child-run metrics and the predictions artifacts (PNG via matplotlib, Agg)."""

from __future__ import annotations

import tempfile
import textwrap
from collections.abc import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from runner.report.errors import ReportError  # noqa: E402
from runner.report.select import resolve_metric  # noqa: E402
from runner.report.table import order_values  # noqa: E402
from runner.tracking import RunQueryError, download_artifact  # noqa: E402

PREDICTIONS = "predictions/test.npz"
# a metric's last part -> (its name in words, the unit of its logged value)
QUANTITIES = {
    "acc": ("accuracy", "fraction"),
    "f1": ("F1", "fraction"),
    "ece": ("ECE", "fraction"),
    "precision": ("precision", "fraction"),
    "recall": ("recall", "fraction"),
    "nll": ("NLL", "nats"),
    "loss": ("loss", "nats"),
    "size_bytes": ("model size", "bytes"),
    "zip_bytes": ("compressed file size", "bytes"),
    "weight_bytes": ("weight size", "bytes"),
    "params": ("parameters", "count"),
    "nonzero_params": ("non-zero parameters", "count"),
    "macs": ("MACs per sample", "count"),
    "latency_ms": ("latency", "ms per batch"),
    "compression_ratio": ("size ratio", "x"),
    "speedup": ("speedup", "x"),
}
ROLES = {"members": "members", "compressed": "compressed", "fused": "fused", "fused_compressed": "fused compressed"}
DIFFERENCES = {"gain": "gain", "delta": "change"}


def unit(metric: str, scale: Mapping[str, float]) -> str | None:
    """The unit a plot shows `metric` in (its logged unit times the table's `scale`): a fraction x 100
    is in %, a difference of fractions x 100 in points; None for a metric whose unit is unknown."""
    parts = metric.split("/")
    logged = QUANTITIES.get(parts[-1], (None, None))[1]
    factor = float(scale.get(metric, 1.0))
    if logged is None or factor == 1:
        return logged
    if logged == "fraction" and factor == 100:
        return "points" if any(p in DIFFERENCES for p in parts) else "%"
    return f"{logged} x {factor:g}"


def axis_label(metric: str, labels: Mapping[str, str], scale: Mapping[str, float]) -> str:
    """One quantity and its unit: the metric's table label, else its name in words and the unit
    it is shown in, e.g. `fused/gain/nll` -> "fused NLL gain (nats)"."""
    if metric in labels:
        return str(labels[metric])
    parts = metric.split("/")
    if parts[-1] not in QUANTITIES:
        return metric
    words = ["best member"] if "best" in parts[1:-1] else [ROLES[parts[0]]] if parts[0] in ROLES else []
    words += ["test"] if "test" in parts[:-1] else []
    words.append(QUANTITIES[parts[-1]][0])
    words += [DIFFERENCES[p] for p in parts[:-1] if p in DIFFERENCES]
    return f"{' '.join(words)} ({unit(metric, scale)})"


def _title(ax: plt.Axes, title: str) -> None:
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (smaller x, larger y), by increasing x."""
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return front


def _err(value: float) -> float | None:
    """An error bar only where there is a spread (n > 1): none, not a zero-width cap, for one run."""
    return None if value is None or np.isnan(value) or value == 0 else value


MARKERS = "oD^v<>ph*"  # squares are the baseline's


def _sizes(n: int, largest: float = 11.0, smallest: float = 4.5) -> list[float]:
    """Marker sizes, largest first: series drawn later are smaller, so points that coincide stay visible."""
    return [largest - (largest - smallest) * i / max(n - 1, 1) for i in range(n)]


def pareto_figure(
    groups: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str, baseline: pd.DataFrame | None = None
) -> plt.Figure:
    """`groups`: one line per group with columns label, x_mean, x_std, y_mean, y_std. `baseline`
    (same columns): the uncompressed models, drawn as squares and part of the front.

    Series often coincide (the same uncompressed members behind every compressed row): each has its
    own marker and colour and is drawn smaller than the one before (the groups half-transparent), so
    every series shows however many share a point.
    """
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    base = baseline if baseline is not None and len(baseline) else groups.iloc[:0]
    sizes = _sizes(len(groups) + len(base))
    for i, (_, g) in enumerate(groups.iterrows()):
        ax.errorbar(
            g.x_mean,
            g.y_mean,
            xerr=_err(g.x_std),
            yerr=_err(g.y_std),
            fmt=MARKERS[i % len(MARKERS)],
            ms=sizes[i],
            color=f"C{i % 10}",
            mec="k",
            mew=0.5,
            alpha=0.8,
            capsize=3,
            label=g.label,
        )
    for j, (_, g) in enumerate(base.iterrows()):
        i = len(groups) + j
        ax.errorbar(
            g.x_mean,
            g.y_mean,
            xerr=_err(g.x_std),
            yerr=_err(g.y_std),
            fmt="s",
            mfc="none",
            mew=1.5,
            ms=sizes[i],
            color=f"C{i % 10}",
            capsize=3,
            label=g.label,
        )
    every = pd.concat([groups, base], ignore_index=True)
    front = pareto_front(list(every.x_mean), list(every.y_mean))
    ax.step(
        every.x_mean.iloc[front],
        every.y_mean.iloc[front],
        where="post",
        color="k",
        lw=1,
        ls="--",
        label="Pareto front",
        zorder=1,
    )
    if (every.x_mean > 0).all() and every.x_mean.max() / max(every.x_mean.min(), 1e-12) > 20:
        ax.set_xscale("log")
    ax.margins(0.12)  # a point on the edge keeps its whole marker
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _title(ax, title)
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda k: names[k] == "Pareto front")  # the series first, in order
    handles, names = [handles[k] for k in order], [names[k] for k in order]
    if len(every) > 6:  # many groups: the legend beside the axes, not over the points
        fig.set_size_inches(9, 4.8)
        ax.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(handles, names, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def reliability_curve(
    probs: np.ndarray, targets: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per confidence bin: mean confidence, accuracy, count; and the ECE (L1, as torchmetrics)."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    conf = np.bincount(index, confidence, bins) / np.maximum(count, 1)
    acc = np.bincount(index, correct, bins) / np.maximum(count, 1)
    ece = float(np.sum(count / len(targets) * np.abs(acc - conf)))
    return conf, acc, count, ece


def reliability_figure(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], bins: int, title: str) -> plt.Figure:
    """`curves`: label -> the (probs, targets) of each run of that group. The curve pools the runs'
    predictions; the legend's ECE is the mean of the runs' own ECEs, as the tables report it."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfect calibration")
    for label, runs in curves.items():
        probs, targets = np.concatenate([p for p, _ in runs]), np.concatenate([t for _, t in runs])
        conf, acc, count, _ = reliability_curve(probs, targets, bins)
        eces = [reliability_curve(p, t, bins)[3] for p, t in runs]
        ece = f"ECE {np.mean(eces):.3f}" + (f" ± {np.std(eces, ddof=1):.3f}, {len(eces)} runs" if len(eces) > 1 else "")
        keep = count > 0
        ax.plot(conf[keep], acc[keep], marker="o", ms=3, label=f"{label} ({ece})")
    ax.set(xlabel="confidence (fraction)", ylabel="accuracy (fraction)", xlim=(0, 1), ylim=(0, 1))
    _title(ax, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def gain_figure(
    groups: pd.DataFrame, metrics: Sequence[str], title: str, names: Mapping[str, str] | None = None
) -> plt.Figure:
    """`groups`: one line per group with label and `<metric>_mean` / `<metric>_std` columns; `names`:
    metric -> its axis label, one quantity and its unit (plots.axis_label).

    One panel per metric, each on its own axis and scale: accuracy in points and NLL in nats never
    share an axis (nor hide each other's bars). Groups without any gain (e.g. the members beside the
    fused models) are left out.
    """
    groups = groups[groups[[f"{m}_mean" for m in metrics]].notna().any(axis=1)].reset_index(drop=True)
    fig, axes = plt.subplots(
        len(metrics),
        1,
        sharex=True,
        squeeze=False,
        dpi=120,
        figsize=(min(14, max(5, 0.5 * len(groups) + 2.5)), 1.4 + 1.9 * len(metrics)),
    )
    x = np.arange(len(groups))
    for i, (ax, metric) in enumerate(zip(axes[:, 0], metrics)):
        spread = groups[f"{metric}_std"]
        spread = spread.where(spread > 0)  # NaN: no bar (one run, or runs that agree), not a flat cap
        ax.bar(
            x,
            groups[f"{metric}_mean"],
            0.6,
            yerr=None if spread.isna().all() else spread,
            capsize=3,
            color=f"C{i % 10}",
        )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("\n".join(textwrap.wrap((names or {}).get(metric, metric), 24)), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(x, groups.label, rotation=20, ha="right")
    fig.suptitle("\n".join(textwrap.wrap(title, 70) + ["gain over the best member (above 0: better)"]), fontsize=9)
    fig.tight_layout()
    return fig


def groups_of(df: pd.DataFrame, group: Sequence[str], labels: Mapping[str, str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(key values, runs) per group, in the tables' order."""
    if not group:
        return [((), df)]
    keys = df[list(group)].fillna("none").astype(str)
    parts = {
        (v if isinstance(v, tuple) else (v,)): part for v, part in df.groupby([keys[c] for c in group], sort=False)
    }
    return [(v, parts[v]) for v in order_values(list(parts), labels)]


def group_stats(
    df: pd.DataFrame,
    group: Sequence[str],
    label: Callable[[tuple], str],
    metrics: dict[str, str],
    option: str,
    labels: Mapping[str, str],
    scale: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Mean and std of each metric (name -> metric key) per group of runs, times the table's `scale`
    for that metric (so a plot shows the tables' units); std is NaN for a group of one run."""
    columns = {name: resolve_metric(df, m, option) for name, m in metrics.items()}
    records = []
    for value, part in groups_of(df, group, labels):
        rec = {"label": label(value)}
        for name, column in columns.items():
            factor = float((scale or {}).get(metrics[name], 1.0))
            values = part[column].dropna().astype(float) * factor
            rec[f"{name}_mean"] = values.mean()
            rec[f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        records.append(rec)
    return pd.DataFrame(records)


def load_predictions(uri: str, run_ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probs, targets) of each run."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run_id in enumerate(run_ids):
            try:
                path = download_artifact(uri, run_id, PREDICTIONS, f"{tmp}/{i}")
            except RunQueryError as e:
                raise ReportError(f"reliability needs {PREDICTIONS} of every selected child run: {e}") from None
            with np.load(path) as data:
                found.append((data["probs"], data["targets"]))
    return found

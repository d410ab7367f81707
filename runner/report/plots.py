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
AXES = {"test/acc": "test accuracy", "test/nll": "test NLL", "test/ece": "test ECE", "test/f1": "test F1",
        "size_bytes": "model size (bytes)", "zip_bytes": "compressed file size (bytes)", "params": "parameters",
        "macs": "MACs per sample", "latency_ms": "latency (ms per batch)", "gain/acc": "accuracy gain",
        "gain/nll": "NLL gain", "gain/f1": "F1 gain", "gain/ece": "ECE gain"}


def axis_label(metric: str, labels: Mapping[str, str], scale: Mapping[str, float]) -> str:
    """A metric's name in words: its table label, else a known name, in the table's unit."""
    if metric in labels:
        return str(labels[metric])
    suffix = next((k for k in AXES if metric == k or metric.endswith("/" + k)), None)
    name = AXES[suffix] if suffix else metric
    if metric.startswith(("members/", "compressed/", "fused/", "fused_compressed/")) and suffix:
        name = f"{metric.split('/')[0].replace('_', ' ')} {name}"
    return f"{name} ({'points' if '/gain/' in metric or '/delta/' in metric or metric.startswith(('gain/', 'delta/')) else '%'})" \
        if float(scale.get(metric, 1.0)) == 100 else name


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


def pareto_figure(groups: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str,
                  baseline: pd.DataFrame | None = None) -> plt.Figure:
    """`groups`: one line per group with columns label, x_mean, x_std, y_mean, y_std. `baseline`
    (same columns): the uncompressed models, drawn as squares and part of the front."""
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    markers = "oD^v<>ph*"  # colours repeat after ten groups: the marker changes with them
    for i, (_, g) in enumerate(groups.iterrows()):
        ax.errorbar(g.x_mean, g.y_mean, xerr=_err(g.x_std), yerr=_err(g.y_std), fmt=markers[i // 10 % len(markers)],
                    capsize=3, label=g.label)
    every = groups
    if baseline is not None and len(baseline):
        for _, g in baseline.iterrows():
            ax.errorbar(g.x_mean, g.y_mean, xerr=_err(g.x_std), yerr=_err(g.y_std), fmt="s", mfc="none",
                        capsize=3, label=g.label)
        every = pd.concat([groups, baseline], ignore_index=True)
    front = pareto_front(list(every.x_mean), list(every.y_mean))
    ax.step(every.x_mean.iloc[front], every.y_mean.iloc[front], where="post", color="k", lw=1, ls="--",
            label="Pareto front")
    if (every.x_mean > 0).all() and every.x_mean.max() / max(every.x_mean.min(), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _title(ax, title)
    ax.grid(alpha=0.3)
    if len(every) > 6:  # many groups: the legend beside the axes, not over the points
        fig.set_size_inches(9, 4.8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def reliability_curve(probs: np.ndarray, targets: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
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
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    _title(ax, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def gain_figure(groups: pd.DataFrame, metrics: Sequence[str], title: str,
                names: Mapping[str, str] | None = None, ylabel: str = "gain over the best member",
                ) -> plt.Figure:
    """`groups`: one line per group with label and `<metric>_mean` / `<metric>_std` columns.

    Groups without any gain (e.g. the members beside the fused models) are left out.
    """
    groups = groups[groups[[f"{m}_mean" for m in metrics]].notna().any(axis=1)].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(min(14, max(5, 0.3 * len(groups) * len(metrics) + 2)), 4.5), dpi=120)
    width = 0.8 / len(metrics)
    x = np.arange(len(groups))
    for i, metric in enumerate(metrics):
        spread = groups[f"{metric}_std"]
        spread = spread.where(spread > 0)  # NaN: no bar (one run, or runs that agree), not a flat cap
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, groups[f"{metric}_mean"], width,
               yerr=None if spread.isna().all() else spread, capsize=3,
               label=(names or {}).get(metric, metric))
    ax.axhline(0, color="k", lw=0.8)
    ax.text(0.01, 0.99, "above 0: better than the best member", transform=ax.transAxes, va="top", fontsize=7,
            color="#555")
    ax.set_xticks(x, groups.label, rotation=20, ha="right")
    ax.set(ylabel=ylabel)
    _title(ax, title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def groups_of(df: pd.DataFrame, group: Sequence[str], labels: Mapping[str, str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(key values, runs) per group, in the tables' order."""
    if not group:
        return [((), df)]
    keys = df[list(group)].fillna("none").astype(str)
    parts = {(v if isinstance(v, tuple) else (v,)): part
             for v, part in df.groupby([keys[c] for c in group], sort=False)}
    return [(v, parts[v]) for v in order_values(list(parts), labels)]


def group_stats(df: pd.DataFrame, group: Sequence[str], label: Callable[[tuple], str],
                metrics: dict[str, str], option: str, labels: Mapping[str, str],
                scale: Mapping[str, float] | None = None) -> pd.DataFrame:
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

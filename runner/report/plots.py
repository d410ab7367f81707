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


def pareto_figure(groups: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str) -> plt.Figure:
    """`groups`: one line per group with columns label, x_mean, x_std, y_mean, y_std."""
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for _, g in groups.iterrows():
        ax.errorbar(g.x_mean, g.y_mean, xerr=np.nan_to_num(g.x_std), yerr=np.nan_to_num(g.y_std),
                    fmt="o", capsize=3, label=g.label)
    front = pareto_front(list(groups.x_mean), list(groups.y_mean))
    ax.step(groups.x_mean.iloc[front], groups.y_mean.iloc[front], where="post", color="k", lw=1, ls="--",
            label="Pareto front")
    if (groups.x_mean > 0).all() and groups.x_mean.max() / max(groups.x_mean.min(), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _title(ax, title)
    ax.grid(alpha=0.3)
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


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], bins: int, title: str) -> plt.Figure:
    """`curves`: label -> (probs, targets), all runs of that group concatenated."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfect calibration")
    for label, (probs, targets) in curves.items():
        conf, acc, count, ece = reliability_curve(probs, targets, bins)
        keep = count > 0
        ax.plot(conf[keep], acc[keep], marker="o", ms=3, label=f"{label} (ECE {ece:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    _title(ax, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def gain_figure(groups: pd.DataFrame, metrics: Sequence[str], title: str) -> plt.Figure:
    """`groups`: one line per group with label and `<metric>_mean` / `<metric>_std` columns.

    Groups without any gain (e.g. the members beside the fused models) are left out.
    """
    groups = groups[groups[[f"{m}_mean" for m in metrics]].notna().any(axis=1)].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(min(14, max(5, 0.3 * len(groups) * len(metrics) + 2)), 4.5), dpi=120)
    width = 0.8 / len(metrics)
    x = np.arange(len(groups))
    for i, metric in enumerate(metrics):
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, groups[f"{metric}_mean"], width,
               yerr=np.nan_to_num(groups[f"{metric}_std"]), capsize=3, label=metric)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, groups.label, rotation=20, ha="right")
    ax.set(ylabel="gain over the best member (positive = better)")
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
                metrics: dict[str, str], option: str, labels: Mapping[str, str]) -> pd.DataFrame:
    """Mean and std of each metric (name -> metric key) per group of runs."""
    columns = {name: resolve_metric(df, m, option) for name, m in metrics.items()}
    records = []
    for value, part in groups_of(df, group, labels):
        rec = {"label": label(value)}
        for name, column in columns.items():
            rec[f"{name}_mean"] = part[column].astype(float).mean()
            rec[f"{name}_std"] = part[column].astype(float).std(ddof=1)
        records.append(rec)
    return pd.DataFrame(records)


def load_predictions(uri: str, run_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    probs, targets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run_id in enumerate(run_ids):
            try:
                path = download_artifact(uri, run_id, PREDICTIONS, f"{tmp}/{i}")
            except RunQueryError as e:
                raise ReportError(f"reliability needs {PREDICTIONS} of every selected child run: {e}") from None
            with np.load(path) as data:
                probs.append(data["probs"])
                targets.append(data["targets"])
    return np.concatenate(probs), np.concatenate(targets)

"""Figures logged as artifacts (plain matplotlib Figures, no pyplot state: they pickle to the MLflow worker)."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure


def confusion_matrix_figure(matrix: torch.Tensor, title: str = "", classes: list[str] | None = None) -> Figure:
    """Counts of (true, predicted) classes; the axes name the classes when their names are known."""
    matrix = matrix.cpu().numpy()
    n = matrix.shape[0]
    fig = Figure(figsize=(1.0 + 0.45 * n, 0.8 + 0.45 * n), dpi=100)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    if classes and len(classes) == n:
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels(classes, fontsize=7)
    fig.tight_layout()
    return fig

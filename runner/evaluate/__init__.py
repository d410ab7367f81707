"""Test-set metrics (torchmetrics), with the model's size, MACs and latency (runner/measure.py).

One forward pass per split and model: `predict_proba` returns the probabilities once and every
metric is computed from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from runner.batches import Inputs, split_batch, take, to_device
from runner.device import device_of
from runner.measure import (  # noqa: F401  (public API: what evaluate_model reports)
    LatencyStats,
    count_macs,
    latency_ms,
    latency_stats,
    size_metrics,
    weight_bytes,
)


def _nll(probs: torch.Tensor, target: torch.Tensor, num_classes: int, bins: int) -> torch.Tensor:
    """The mean negative log-likelihood of the targets, in float64 and with no floor: probabilities
    come from a float64 softmax, so this is scikit-learn's log_loss on them (which only clips below
    float64's eps, a log-likelihood under -36)."""
    return -probs.double().gather(1, target[:, None]).log().mean()


# name -> fn(probs, target, num_classes, ece_bins); macro averages over classes.
METRICS: dict[str, Callable[..., torch.Tensor]] = {
    "acc": lambda p, t, c, b: multiclass_accuracy(p, t, c, average="micro"),
    "precision": lambda p, t, c, b: multiclass_precision(p, t, c, average="macro"),
    "recall": lambda p, t, c, b: multiclass_recall(p, t, c, average="macro"),
    "f1": lambda p, t, c, b: multiclass_f1_score(p, t, c, average="macro"),
    "nll": _nll,
    "ece": lambda p, t, c, b: multiclass_calibration_error(p, t, c, n_bins=b, norm="l1"),
}


@torch.no_grad()
def predict_proba(model: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and targets for every batch of a loader, computed on the model's device
    (batches are moved there) and returned on the CPU."""
    model.eval()
    device = device_of(model)
    probs, targets = [], []
    for batch in batches:
        x, y = split_batch(batch)
        logits = model(to_device(x, device))
        probs.append(torch.softmax(logits.double(), dim=1).cpu())  # float64: exact NLL (see _nll)
        targets.append(y.cpu())
    return torch.cat(probs), torch.cat(targets)


def classification_metrics(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    names: Iterable[str] = tuple(METRICS),
    ece_bins: int = 15,
) -> dict[str, float]:
    # an average of probabilities may round to 1 + 2e-16; torchmetrics would then take the
    # probabilities for logits and softmax them again (ECE 0.72 instead of 0.03 for a mean of 5 CNNs)
    probs = probs.clamp(0.0, 1.0)
    return {name: float(METRICS[name](probs, target, num_classes, ece_bins)) for name in names}


def confusion_matrix(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return multiclass_confusion_matrix(probs, target, num_classes)


def evaluate_model(
    model: nn.Module,
    batches: Iterable,
    num_classes: int,
    metrics: Iterable[str],
    ece_bins: int = 15,
    latency_batch: Inputs | None = None,
    latency_repeats: int = 30,
    probs: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    *,
    latency_warmup_s: float = 0.2,
    latency_min_time_s: float = 0.5,
    latency_max_repeats: int = 10_000,
    latency_threads: int | None = None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor]:
    """All metrics of one model on one split from a single forward pass.

    Returns (metrics, probabilities, confusion matrix, targets); the probabilities are kept so
    fusion and reports reuse them instead of running the model again. Pass `probs` and `targets`
    when they are already known (e.g. an output-level fusion of the members' test
    probabilities): no forward pass then.

    With `latency_batch`, latency_stats() times the model on it (the `latency_*` arguments are its
    own) and the metrics get latency_ms (median), latency_q25_ms / latency_q75_ms, latency_iqr_ms,
    latency_repeats and latency_threads.
    """
    if probs is None:
        probs, targets = predict_proba(model, batches)
    elif targets is None:
        targets = torch.cat([split_batch(b)[1] for b in batches])
    results = classification_metrics(probs, targets, num_classes, metrics, ece_bins)
    results.update(size_metrics(model))
    if latency_batch is not None:
        results.update(
            latency_stats(
                model,
                latency_batch,
                latency_repeats,
                warmup_s=latency_warmup_s,
                min_time_s=latency_min_time_s,
                max_repeats=latency_max_repeats,
                threads=latency_threads,
            ).metrics()
        )
        macs = count_macs(model, take(latency_batch, slice(0, 1)))
        if macs is not None:
            results["macs"] = macs
    return results, probs, confusion_matrix(probs, targets, num_classes), targets

"""Test-set metrics (torchmetrics), model size and CPU latency (runner/evaluate/latency.py).

One forward pass per split and model: `predict_proba` returns the probabilities once and every
metric is computed from them.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Callable, Iterable
from typing import Any

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

from runner.data.batches import Inputs, num_samples, split_batch, take, to_device
from runner.device import device_of
from runner.evaluate.latency import LatencyStats, latency_ms, latency_stats  # noqa: F401  (public API)


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


def _tensors(value: object) -> Iterable[torch.Tensor]:
    """Tensors inside a state_dict value: quantized layers keep theirs in tuples / packed objects."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, torch.ScriptObject) and value._has_method("__getstate__"):
        yield from _tensors(value.__getstate__())


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, (tuple, list)):  # packed quantized params: (weight, bias)
        return sum(_tensor_bytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if value.is_quantized:
        qparams = 16  # one float64 scale + one int64 zero point
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            qparams *= value.q_per_channel_scales().numel()
        return value.numel() * value.element_size() + qparams
    return value.numel() * value.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state_dict's tensor data (weights, biases, quantization scales).

    `size_bytes` is the serialized state_dict, whose fixed cost per tensor (~0.5-1 KB of pickle
    and zip records) dominates a model of a few thousand parameters and hides what int8 saves.
    Zeros still count: unstructured sparsity needs a sparse format to save bytes.
    """
    return sum(_tensor_bytes(v) for v in model.state_dict().values())


def size_metrics(model: nn.Module) -> dict[str, float]:
    """Parameter count, non-zero parameters and the size of the serialized state_dict in bytes,
    plain (`size_bytes`) and DEFLATE-compressed (`zip_bytes`: LZ77 + Huffman coding, the entropy
    coding stage of Deep Compression; it is what unstructured zeros save on disk).

    Buffers (BatchNorm statistics) are not parameters and are not counted. Quantized (int8) models
    keep their weights outside `parameters()`, as quantized tensors in packed params: they are
    counted from the state_dict, without the scale / zero-point scalars.
    """
    state = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    stored = [
        t
        for k, v in state.items()
        if k not in buffers and not re.search(r"(scale|zero_point)(_\d+)?$", k)
        for t in _tensors(v)
        if t.is_quantized or t.is_floating_point()
    ]
    params = stored if any(t.is_quantized for t in stored) else list(model.parameters())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return {
        "zip_bytes": float(len(zlib.compress(buffer.getbuffer(), 6))),
        "params": float(sum(t.numel() for t in params)),
        "nonzero_params": float(
            sum(int(torch.count_nonzero(t.dequantize() if t.is_quantized else t.detach())) for t in params)
        ),
        "size_bytes": float(buffer.getbuffer().nbytes),
        "weight_bytes": float(weight_bytes(model)),
    }


@torch.no_grad()
def count_macs(model: nn.Module, x: Inputs) -> float | None:
    """Multiply-accumulates of one forward pass per sample of `x`, from torch's FlopCounterMode
    (matmuls, convolutions, attention); None when it counts nothing (int8 kernels are not aten
    ops: a quantization step reports the MACs of the float model it quantized instead)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    flops = counter.get_total_flops()
    return flops / 2 / num_samples(x) if flops else None


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

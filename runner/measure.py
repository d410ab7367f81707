"""Measuring a model: parameters, size, MACs and latency, whatever made it (training, compression, fusion).

Latency is measured so that two numbers can be compared. On a shared CPU the same small CNN measured
0.25 ms in one run and 104 ms in another: a lone median of 30 calls says little. So every measurement
warms up by time as well as by calls (oneDNN builds its primitives and lazy modules their kernels on
the first calls), times calls until a minimum total time is reached, holds the torch thread count
fixed, and reports the interquartile range, the number of timed calls and the thread count along
with the median.
"""

from __future__ import annotations

import io
import re
import statistics
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from runner.batches import Inputs, num_samples
from runner.heap import release_freed_memory


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
    if is_traceable_wrapper_subclass(value):  # torchao's quantized weights: int8 / packed int4 values, scales
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name)) for name in names)
    if value.is_quantized:
        qparams = 16  # one float64 scale + one int64 zero point
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            qparams *= value.q_per_channel_scales().numel()
        return value.numel() * value.element_size() + qparams
    return value.numel() * value.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the state_dict's tensor data (weights, biases, quantization scales; a torchao weight
    counts the tensors it holds: int8 or packed int4 values, scales, zero points).

    `size_bytes` is the serialized state_dict, whose fixed cost per tensor (~0.5-1 KB of pickle
    and zip records) dominates a model of a few thousand parameters and hides what int8 saves.
    Zeros still count: unstructured sparsity needs a sparse format to save bytes. A tensor the
    state_dict lists twice (tied weights: a language model's output layer is its input embedding)
    counts once.
    """
    total, seen = 0, set()
    for value in model.state_dict().values():
        if torch.is_tensor(value) and not is_traceable_wrapper_subclass(value) and not value.is_quantized:
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.dtype)
            if value.numel() and key in seen:
                continue
            seen.add(key)
        total += _tensor_bytes(value)
    return total


def _nonzero(t: torch.Tensor) -> int:
    """Non-zero entries of a weight, quantized ones as their dequantized values; a torchao weight in
    a packed layout with no dequantize (Int4OpaqueTensor) counts every entry (its asymmetric grid
    has no exact zero)."""
    if t.is_quantized or is_traceable_wrapper_subclass(t):
        try:
            t = t.dequantize()
        except NotImplementedError:
            return t.numel()
    return int(torch.count_nonzero(t.detach()))


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
        "nonzero_params": float(sum(_nonzero(t) for t in params)),
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


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one forward pass over a batch, in milliseconds, over `repeats` timed calls
    made with `threads` torch CPU threads."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int
    threads: int

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def metrics(self) -> dict[str, float]:
        """The keys evaluate_model logs; compression_report reads the quartiles back."""
        return {
            "latency_ms": self.median_ms,
            "latency_q25_ms": self.q25_ms,
            "latency_q75_ms": self.q75_ms,
            "latency_iqr_ms": self.iqr_ms,
            "latency_repeats": float(self.repeats),
            "latency_threads": float(self.threads),
        }


def _on_cuda(model: nn.Module, x: Inputs) -> bool:
    inputs = x.values() if isinstance(x, dict) else [x]
    return any(t.is_cuda for t in chain(model.parameters(), model.buffers(), inputs))


def _no_sync() -> None:
    pass


@torch.no_grad()
def latency_stats(
    model: nn.Module,
    x: Inputs,
    repeats: int = 30,
    warmup: int = 3,
    warmup_s: float = 0.2,
    min_time_s: float = 0.5,
    max_repeats: int = 10_000,
    threads: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Median and quartiles of the wall time of `model(x)`.

    Warm-up: at least `warmup` calls and at least `warmup_s` seconds, none of them timed. Then at
    least `repeats` timed calls, more until they add up to `min_time_s`, at most `max_repeats`
    (unless `repeats` is larger). `threads` (default: the current count) is set for the measurement
    and the previous count restored afterwards. On a CUDA model or input each call is bracketed by
    `torch.cuda.synchronize()` so the kernels, not their launch, are timed. `clock` is for tests.
    """
    model.eval()
    before = torch.get_num_threads()
    threads = threads or before
    sync = torch.cuda.synchronize if _on_cuda(model, x) else _no_sync
    torch.set_num_threads(threads)
    try:
        calls, start = 0, clock()
        while calls < warmup or clock() - start < warmup_s:
            model(x)
            calls += 1
        times: list[float] = []
        total = 0.0
        while len(times) < max(repeats, 1) or (total < min_time_s and len(times) < max_repeats):
            sync()
            t0 = clock()
            model(x)
            sync()
            times.append(clock() - t0)
            total += times[-1]
    finally:
        torch.set_num_threads(before)
    # "inclusive": the quartiles of the timings themselves (numpy's default), never outside them
    q25, _, q75 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return LatencyStats(1000.0 * statistics.median(times), 1000.0 * q25, 1000.0 * q75, len(times), threads)


def latency_ms(model: nn.Module, x: Inputs, repeats: int = 30, warmup: int = 3) -> float:
    """The median of latency_stats(), in milliseconds."""
    return latency_stats(model, x, repeats, warmup).median_ms


def _rss_kb(field: str = "VmRSS") -> int | None:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: the peak), None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """The peak resident memory (RSS) of this process while the block runs, in MB above what it held
    when the block started: `with PeakMemory() as peak: ...; peak.mb`. What the process had freed
    but kept (glibc keeps a freed heap top up to a threshold) is given back first, so the block's
    allocations count whatever ran before it.

    Linux keeps the peak (VmHWM); writing 5 to /proc/self/clear_refs resets it to the current RSS, so
    the peak read at the end is this block's. Where that is not allowed, a thread samples VmRSS every
    5 ms (a peak shorter than that can be missed). NaN where /proc is not there.
    """

    def __enter__(self) -> PeakMemory:
        self.mb = float("nan")
        release_freed_memory()  # memory the process freed but kept would be reused unseen: give it back first
        self._before = _rss_kb()
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._reset = True
        except OSError:
            self._reset = False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            if (rss := _rss_kb()) is not None:
                self._samples.append(rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = _rss_kb("VmHWM") if self._reset else max(self._samples + [_rss_kb() or 0])
        if self._before is not None and peak:
            self.mb = max(peak - self._before, 0) / 1024

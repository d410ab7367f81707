"""Latency of one forward pass, measured so that two numbers can be compared.

On a shared CPU the same small CNN measured 0.25 ms in one run and 104 ms in another: a lone median
of 30 calls says little. So every measurement warms up by time as well as by calls (oneDNN builds
its primitives and lazy modules their kernels on the first calls), times calls until a minimum total
time is reached, holds the torch thread count fixed, and reports the interquartile range, the number
of timed calls and the thread count along with the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from runner.data.batches import Inputs


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

"""runner/heap.py: while a network trains, memory a step frees is reused by the next step instead of being
given back to the system and faulted in again page by page; after training it is given back."""

from __future__ import annotations

import resource
from contextlib import contextmanager

import pytest
import pytorch_lightning as pl
import torch
from conftest import FAST_TRAINER

import runner.train
from runner.heap import kept_heap, kept_heap_enabled
from runner.measure import _rss_kb
from runner.models import MLP

pytestmark = pytest.mark.skipif(not kept_heap_enabled(), reason="glibc's malloc settings (Linux) only")

MB = 2**20
STEP_MB = 40 * 8 + 48  # 40 blocks of 8 MB and one of 48 MB (above glibc's 32 MB ceiling for heap blocks)
PAGES = STEP_MB * MB // 4096
BIG_PAGES = 48 * MB // 4096


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _steps(n: int) -> list[int]:
    """Minor page faults of each of `n` steps that write STEP_MB of new tensors and free them all."""
    per = []
    for _ in range(n):
        before = _faults()
        blocks = [torch.ones(8 * MB // 4) for _ in range(40)] + [torch.ones(48 * MB // 4)]
        del blocks
        per.append(_faults() - before)
    return per


def test_a_kept_heap_reuses_what_a_step_freed_and_gives_it_back_after():
    outside = _steps(3)
    with kept_heap():
        inside = _steps(6)
        held = _rss_kb()
    after = _rss_kb()
    # glibc's defaults: every step faults the 48 MB block in again (taken from the system, given back);
    # whether the 8 MB ones are too depends on what the process did before (glibc adapts its thresholds)
    assert min(outside[1:]) > 0.9 * BIG_PAGES, outside
    # kept: the five steps after the first fault in less than one 48 MB block's pages in all (the heap
    # may still grow once where a block does not fit what was freed; without the settings: 5 blocks)
    assert sum(inside[1:]) < 1.5 * BIG_PAGES, inside
    # and the kept memory goes back to the system when training ends
    assert (held - after) / 1024 > 0.8 * STEP_MB, (held, after)
    assert min(_steps(2)[1:]) > 0.9 * BIG_PAGES  # back to glibc's ways


def test_training_runs_inside_a_kept_heap(monkeypatch, wine):
    seen = []

    @contextmanager
    def recorded():
        seen.append("open")
        with kept_heap():
            yield
        seen.append("closed")

    class Check(pl.Callback):
        def on_train_batch_start(self, *args):
            seen.append("step")

    monkeypatch.setattr(runner.train, "kept_heap", recorded)
    runner.train.train_classifier(MLP(13, 3), wine, FAST_TRAINER, {"name": "adam", "lr": 1e-3}, callbacks=[Check()])
    assert seen[0] == "open" and seen[-1] == "closed" and "step" in seen[1:-1], seen

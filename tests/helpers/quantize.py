"""Shared test helpers (moved from tests/unit/test_quantize.py)."""

from __future__ import annotations

import torch
from torch import nn

from runner.batches import DataSpec, Inputs, num_samples, take
from runner.compress import (
    CompressContext,
    Recipe,
)


def inputs(shape: tuple[int, ...], n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def seeded(make):
    torch.manual_seed(0)
    return make().eval()


def quantize_step(step, model: nn.Module, x: Inputs) -> nn.Module:
    """A step applied as a recipe applies it (the model is not changed, stats are collected)."""
    recipe = Recipe([step])
    recipe.check(model, DataSpec(10, take(x, slice(0, 8)), {}))
    return recipe.apply(model, context(x))


def context(x: Inputs) -> CompressContext:
    return CompressContext(Batches(x), {}, {})


class Batches:
    """The two loaders a quantization step reads: calibration (train) and its example (val)."""

    def __init__(self, x: Inputs, batch: int = 16) -> None:
        n = num_samples(x)
        self.batches = [
            (take(x, slice(i, i + batch)), torch.zeros(min(batch, n - i), dtype=torch.long)) for i in range(0, n, batch)
        ]

    def train_dataloader(self) -> list:
        return self.batches

    val_dataloader = train_dataloader

"""Shared test helpers (moved from tests/unit/test_device.py)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from runner.data import SklearnDataset
from runner.models import LitClassifier
from runner.train import fit


def train_lenet(**trainer):
    dm = SklearnDataset("digits", batch_size=64, input_shape=[1, 8, 8], scaling="channel")
    pl.seed_everything(0, verbose=False)
    layouts = Layouts()
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    module = LitClassifier(net, "adam", lr=1e-2)
    fit(
        module,
        dm,
        {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "steps_per_call": 1, **trainer},
        callbacks=[layouts],
    )
    return module.net, layouts.seen


class Layouts(pl.Callback):
    """The layout of the first conv's weight and of the batch at every training step."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        weight = module.net[2].weight  # 4 in, 4 out channels: one layout or the other, not both
        rgb = module._layout(torch.zeros(2, 3, 4, 4))  # what a step does to an image batch
        self.seen.append(
            (
                weight.is_contiguous(memory_format=torch.channels_last),
                rgb.is_contiguous(memory_format=torch.channels_last),
            )
        )

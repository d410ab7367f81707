"""The LightningModule that trains any Net with cross-entropy."""
from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from runner.errors import check

# Unix time of this process's first training step (for the timing/startup_s figure).
first_step_at: float | None = None

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def check_optimizer(name: str, lr: float, weight_decay: float) -> None:
    """The `optim` settings' allowed values (used by the config schema and by LitClassifier)."""
    check(name in OPTIMIZERS, "optim.name", name, sorted(OPTIMIZERS))
    check(lr > 0, "optim.lr", lr, "a float > 0")
    check(weight_decay >= 0, "optim.weight_decay", weight_decay, "a float >= 0")


class LitClassifier(pl.LightningModule):
    """Wraps a Net for training; logs epoch means of loss and accuracy for train and val.

    Optimization is manual so one Lightning step can take several optimizer steps: a training
    batch is either (x, y) or a list of (x, y) batches (see TensorBatches' `chunk`). For small
    models Lightning's per-step bookkeeping costs more than the math; chunking amortizes it.
    Per-step values are accumulated in tensors and logged once per epoch for the same reason.
    """

    def __init__(self, net: nn.Module, optimizer: str = "adam", lr: float = 1e-2,
                 weight_decay: float = 0.0, momentum: float = 0.0) -> None:
        super().__init__()
        check_optimizer(optimizer, lr, weight_decay)
        self.net = net
        self.optimizer, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def _accumulate(self, split: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        # sums stay on the device (no sync per step): [loss * n, correct], plus a Python count
        with torch.no_grad():
            update = torch.stack([loss * len(y), (logits.argmax(1) == y).sum().to(loss.dtype)])
        sums, count = self._sums.get(split, (0, 0))
        self._sums[split] = (update + sums, count + len(y))

    def _log_epoch(self, split: str) -> None:
        sums, count = self._sums.pop(split, (None, 0))
        if count:
            total = sums.cpu() / count
            self.log_dict({f"{split}/loss": total[0], f"{split}/acc": total[1]})

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Lightning walks every tensor of a batch (a chunk holds dozens); on the CPU there is nothing to move.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets private bookkeeping attributes (e.g. `_current_fx_name`) several times per
        # step; nn.Module.__setattr__'s checks for parameters/modules cost more than a small model's math.
        if name.startswith("_") and not isinstance(value, (torch.Tensor, nn.Module)) \
                and name not in self.__dict__.get("_modules", {}) and name not in self.__dict__.get("_parameters", {}) \
                and name not in self.__dict__.get("_buffers", {}):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def on_train_start(self) -> None:
        global first_step_at
        first_step_at = first_step_at or time.time()

    def training_step(self, batch: tuple | list[tuple], batch_idx: int) -> None:
        optimizer = self.optimizers()
        max_steps = self.trainer.max_steps
        for x, y in batch if isinstance(batch, list) else [batch]:
            if 0 < max_steps <= self.trainer.global_step:
                break
            logits = self.net(x)
            loss = self.loss(logits, y, x)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self._accumulate("train", loss, logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self._accumulate("val", F.cross_entropy(logits, y), logits, y)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            kwargs["momentum"] = self.momentum
        return OPTIMIZERS[self.optimizer](self.net.parameters(), **kwargs)

"""The LightningModule that trains any Net with cross-entropy."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.profilers import PassThroughProfiler
from pytorch_lightning.strategies import SingleDeviceStrategy
from torch import nn

from runner.batches import Chunk, Inputs, split_batch
from runner.config import OPTIMIZERS, check_finetune, check_optimizer
from runner.errors import TrainingDiverged
from runner.models.adapter import head_module

# Unix time of this process's first training step (for the timing/startup_s figure).
first_step_at: float | None = None

# What Lightning's manual_backward and LightningOptimizer.step add to a plain step: these hooks.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
REDUCE_EVERY = 64  # batches whose loss and accuracy are summed in one go
FUSED = ("adam", "adamw")  # optimizers that take fused=True (torch.optim: CPU and CUDA kernels)


class LitClassifier(pl.LightningModule):
    """Wraps a Net for training; logs epoch means of loss and accuracy for train and val.

    For small models Lightning's per-step bookkeeping costs more than the math, so:
    - optimization is manual and one Lightning step may take several optimizer steps: a training
      batch is either one batch (see runner.batches) or a Chunk of (x, y) batches (see
      TensorBatches' `chunk`);
    - on one device in full precision or bf16-mixed, with no hook overridden that Lightning's step wrappers
      would call (see `raw_steps`), a step is the plain PyTorch one plus Lightning's step count;
    - per-batch losses and predictions are kept and reduced every REDUCE_EVERY batches, then
      logged once per epoch (no per-step sync or logging; see `_log_epoch`).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: str = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        finetune: str = "full",
        backbone_lr_factor: float = 1.0,
        probe_epochs: int = 1,
    ) -> None:
        super().__init__()
        check_optimizer(optimizer, lr, weight_decay)
        check_finetune(finetune, backbone_lr_factor, probe_epochs)
        self.net = net
        self.optimizer, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self.finetune, self.backbone_lr_factor, self.probe_epochs = finetune, backbone_lr_factor, probe_epochs
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self._batches: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._raw_steps = False
        self._train_forward = None  # trainer.compile: the compiled forward used by training steps only
        self._channels_last = False  # trainer.channels_last: weights and image batches in NHWC
        self.automatic_optimization = False

    def compile_net(self) -> None:
        """Train with `torch.compile(net.forward)`: a function, not a module, so the net itself (its
        state_dict keys, what is cached, evaluated, compressed and logged) stays the eager one."""
        self._train_forward = torch.compile(self.net.forward)

    def use_channels_last(self) -> None:
        """Train in the channels_last (NHWC) layout, which the GPU's convolution kernels (cuDNN, tensor
        cores) prefer: 4-d weights now, 4-d image batches at each step. `fit` puts the net back to
        the default layout afterwards."""
        self.net.to(memory_format=torch.channels_last)
        self._channels_last = True

    def _layout(self, x: Inputs) -> Inputs:
        if self._channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Inputs) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: Inputs) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def _record(self, split: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        batches = self._batches.setdefault(split, [])
        batches.append((loss.detach(), logits.detach(), y))
        if len(batches) >= REDUCE_EVERY:
            self._reduce(split)

    def _reduce(self, split: str) -> None:
        # sums stay on the device (no sync): [sum of loss * n, correct], plus a Python count
        batches = self._batches.pop(split, [])
        if not batches:
            return
        losses, logits, ys = zip(*batches)
        sizes = [len(y) for y in ys]
        with torch.no_grad():
            weights = torch.tensor(sizes, dtype=torch.float32, device=losses[0].device)
            update = torch.stack(
                [
                    (torch.stack(losses).float() * weights).sum(),
                    (torch.cat(logits).argmax(1) == torch.cat(ys)).sum().float(),
                ]
            )
        sums, count = self._sums.get(split, (0, 0))
        self._sums[split] = (update + sums, count + sum(sizes))

    def _log_epoch(self, split: str) -> None:
        """Epoch means to the loggers and to `trainer.callback_metrics` (what EarlyStopping and
        ModelCheckpoint(monitor=...) read). Not through `self.log`: its bookkeeping costs ~0.5 ms
        per value, about 10% of an epoch of a small model."""
        self._reduce(split)
        sums, count = self._sums.pop(split, (None, 0))
        if not count:
            return
        means = (sums / count).cpu()
        if not torch.isfinite(means[0]):  # NaN metrics must never reach a FINISHED run
            raise TrainingDiverged(
                f"optim.lr={self.lr}: training diverged, the mean {split} loss of epoch "
                f"{self.current_epoch} is {float(means[0])} (optim.name={self.optimizer}); "
                "allowed: a smaller optim.lr"
            )
        metrics = {f"{split}/loss": means[0], f"{split}/acc": means[1]}
        self.trainer.callback_metrics.update(metrics)
        for logger in self.loggers:
            logger.log_metrics(
                {**{k: float(v) for k, v in metrics.items()}, "epoch": self.current_epoch}, step=self.global_step
            )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Lightning walks every tensor of a batch (a chunk holds dozens); on the CPU there is nothing to move.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets private bookkeeping attributes (e.g. `_current_fx_name`) several times per
        # step; nn.Module.__setattr__'s checks for parameters/modules cost more than a small model's math.
        if (
            name.startswith("_")
            and not isinstance(value, (torch.Tensor, nn.Module))
            and name not in self.__dict__.get("_modules", {})
            and name not in self.__dict__.get("_parameters", {})
            and name not in self.__dict__.get("_buffers", {})
        ):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def raw_steps(self) -> bool:
        """Whether Lightning's step wrappers would only call hooks nobody overrides: one device,
        full precision or bf16-mixed (its autocast wraps the whole training step; only fp16's grad
        scaler needs the wrappers), no profiler, no STEP_HOOKS or `backward` overridden by this
        module or a callback."""
        trainer = self.trainer
        overridden = [
            (self, h) for h in (*STEP_HOOKS, "backward") if getattr(type(self), h) is not getattr(pl.LightningModule, h)
        ]
        overridden += [
            (cb, h)
            for cb in trainer.callbacks
            for h in STEP_HOOKS
            if getattr(type(cb), h) is not getattr(pl.Callback, h)
        ]
        plugin = trainer.precision_plugin
        plain = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
        return (
            plain
            and type(trainer.strategy) is SingleDeviceStrategy
            and type(trainer.profiler) is PassThroughProfiler
            and not overridden
        )

    def on_train_start(self) -> None:
        global first_step_at
        first_step_at = first_step_at or time.time()
        self._raw_steps = self.raw_steps()

    def _split_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head) parameters: the head is the final classifier layer (runner.models.adapter)."""
        head = {id(p) for p in head_module(self.net).parameters()}
        params = list(self.net.parameters())
        return [p for p in params if id(p) not in head], [p for p in params if id(p) in head]

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen in `epoch` (optim.finetune: linear_probe, or the probe of lp_ft
        and lp_frozen_head)."""
        probing = self.finetune in ("lp_ft", "lp_frozen_head") and epoch < self.probe_epochs
        return self.finetune == "linear_probe" or probing

    def on_train_epoch_start(self) -> None:
        if self.finetune == "full":
            return
        frozen = self.frozen(self.current_epoch)
        backbone, head = self._split_params()
        for p in backbone:
            p.requires_grad_(not frozen)
        if self.finetune == "lp_frozen_head":  # after the probe the head stays as the probe left it
            for p in head:
                p.requires_grad_(frozen)
        if frozen:  # a probe reads fixed features: no dropout, BatchNorm statistics unchanged
            self.net.eval()
            head_module(self.net).train()

    def on_train_end(self) -> None:
        for p in self.net.parameters():  # what trains next (compression, fusion) finds every weight trainable
            p.requires_grad_(True)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        raw = optimizer.optimizer if self._raw_steps else None
        max_steps = self.trainer.max_steps
        for x, y in batch if isinstance(batch, Chunk) else [split_batch(batch)]:
            if 0 < max_steps <= self.trainer.global_step:
                break
            x = self._layout(x)
            logits = (self._train_forward or self.net)(x)
            loss = self.loss(logits, y, x)
            if raw is None:
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            else:  # the same step without the wrappers; Lightning still counts it (global_step)
                raw.zero_grad()
                loss.backward()
                optimizer._on_before_step()
                raw.step()
                optimizer._on_after_step()
            self._record("train", loss, logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split_batch(batch)
        logits = self.net(self._layout(x))
        self._record("val", F.cross_entropy(logits, y), logits, y)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            kwargs["momentum"] = self.momentum
        params: Any = list(self.net.parameters())
        if self.optimizer in FUSED and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
            # one kernel for all parameters: on a CPU AdamW's step for MiniLM's 22.6M weights takes 24 ms
            # fused against 100-200 ms for the default per-tensor loop (benchmarks/pretrained.py's profile)
            kwargs["fused"] = True
        if self.finetune != "full" or self.backbone_lr_factor != 1.0:
            backbone, head = self._split_params()
            params = [{"params": backbone, "lr": self.lr * self.backbone_lr_factor}, {"params": head}]
        return getattr(torch.optim, OPTIMIZERS[self.optimizer])(params, **kwargs)

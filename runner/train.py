"""Lightning training of one network; also used by compression steps that fine-tune."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
from torch import nn

from runner.device import device_indices, job_device
from runner.errors import check
from runner.heap import kept_heap
from runner.models import LitClassifier

log = logging.getLogger(__name__)


def check_devices(trainer_cfg: Mapping[str, Any]) -> None:
    """An accelerator that is not present, or more devices than there are, fail before training."""
    accelerator, devices = trainer_cfg.get("accelerator", "cpu"), trainer_cfg.get("devices", 1)
    if accelerator in ("gpu", "cuda"):
        check(torch.cuda.is_available(), "trainer.accelerator", accelerator, "cpu or auto (no CUDA GPU is visible)")
        count = torch.cuda.device_count()
        indices = device_indices(devices)
        wanted = len(indices) if indices is not None else devices if isinstance(devices, int) else None
        check(wanted is None or wanted <= count, "trainer.devices", devices, f"at most {count} (the GPUs visible)")
    elif accelerator == "mps":
        check(torch.backends.mps.is_available(), "trainer.accelerator", accelerator, "cpu or auto (no MPS device)")


def build_trainer(
    trainer_cfg: Mapping[str, Any],
    logger: Logger | None = None,
    callbacks: Sequence[pl.Callback] = (),
    **overrides: Any,
) -> pl.Trainer:
    """A Trainer from the `trainer` config group; no checkpoints, summaries or sanity checks."""
    kwargs = {k: v for k, v in {**dict(trainer_cfg), **overrides}.items() if v is not None}
    kwargs.pop("steps_per_call", None)
    kwargs.pop("compile", None)
    kwargs.pop("channels_last", None)
    if kwargs.get("strategy") == "ddp":
        # Lightning's "ddp" re-runs the command in every process: the whole Hydra job (data, MLflow
        # runs, evaluation) N times. Spawned processes run only this fit; this process, rank 0's
        # results in hand, goes on alone (one MLflow job run, one evaluation).
        kwargs["strategy"] = "ddp_spawn"
        # tensors reach the spawned processes through shared-memory files, not file descriptors:
        # with descriptors, two tensors on one storage made multiprocessing pass a descriptor twice
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy("file_system")
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return pl.Trainer(
        logger=logger or False,
        callbacks=list(callbacks),
        enable_checkpointing=checkpointing,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    trainer_cfg: Mapping[str, Any],
    logger: Logger | None = None,
    callbacks: Sequence[pl.Callback] = (),
    ckpt_path: str | None = None,
    **overrides: Any,
) -> pl.LightningModule:
    """Fit `module`; in-memory data goes in chunks of `trainer.steps_per_call` optimizer steps."""
    settings = {**dict(trainer_cfg), **overrides}
    trainer = build_trainer(settings, logger, callbacks)
    chunk = settings.get("steps_per_call", 1)
    nhwc = channels_last(settings, getattr(module, "net", None))
    if nhwc:
        module.use_channels_last()
    if settings.get("compile") and hasattr(module, "compile_net"):
        module.compile_net()
    try:
        with kept_heap():  # what a step frees, the next step reuses (runner/heap.py)
            if (
                getattr(datamodule, "tensor_batches", False)
                and chunk != 1
                and settings.get("limit_train_batches") is None
            ):
                trainer.fit(
                    module,
                    train_dataloaders=datamodule.loader("train", shuffle=True, chunk=chunk),
                    val_dataloaders=datamodule.val_dataloader(),
                    ckpt_path=ckpt_path,
                )
            else:  # limit_train_batches counts single batches, so it keeps one optimizer step per Lightning step
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        if nhwc:  # what comes next (evaluation, compression, export, the cache) gets the default layout
            module.net.to(memory_format=torch.contiguous_format)
    return module


def channels_last(settings: Mapping[str, Any], net: nn.Module | None) -> bool:
    """Whether `fit` trains `net` in the channels_last layout: `trainer.channels_last` (true / false),
    or, when null, for networks with 2-d convolutions trained on a GPU."""
    if net is None or not any(isinstance(m, nn.Conv2d) for m in net.modules()):
        return False
    wanted = settings.get("channels_last")
    return bool(wanted) if wanted is not None else job_device(settings).type == "cuda"


def train_classifier(
    net: nn.Module,
    datamodule: pl.LightningDataModule,
    trainer_cfg: Mapping[str, Any],
    optim_cfg: Mapping[str, Any],
    logger: Logger | None = None,
    callbacks: Sequence[pl.Callback] = (),
    ckpt_path: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Train `net` in place with cross-entropy and return it (resuming from `ckpt_path` if given)."""
    optim = dict(optim_cfg)
    module = LitClassifier(net, optimizer=optim.pop("name", "adam"), **optim)
    # Lightning keeps the modes it is given, and from_pretrained returns models in eval mode (no dropout)
    net.train()
    fit(module, datamodule, trainer_cfg, logger, callbacks, ckpt_path, **overrides)
    return net.eval()

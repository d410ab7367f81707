"""Multi-task training: one backbone trained on every task of a pool at once, each task with its own head
(the "multi-task learning" row of FusionBench's tables, the reference merges are measured against).

The task models are tied: every task's model holds the same backbone parameters and buffers (the first
task's objects; only the heads are each task's own), so one optimizer step moves one backbone. Each
training step takes one batch of every task (Lightning's CombinedLoader, "max_size_cycle": an epoch
runs as long as the largest task's loader, the smaller ones cycle) and minimises the mean of the tasks'
cross-entropies. The optimizer settings are the job's `optim` (name, lr, weight decay, the backbone's
lr factor), as the task fine-tunes use them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import CombinedLoader
from torch import nn

from runner.batches import split_batch
from runner.config import OPTIMIZERS
from runner.fuse.multitask import PoolMerge, TaskModel, backbone_keys
from runner.heap import kept_heap
from runner.models.adapter import head_module
from runner.models.facts import copy_facts
from runner.train import build_trainer


def tie_backbones(nets: Mapping[str, nn.Module]) -> None:
    """Make every net use the first net's backbone parameters and buffers (the heads stay their own)."""
    first, *rest = nets.values()
    first_head = head_module(first)
    shared = {name: m for name, m in first.named_modules() if not _inside(m, first_head)}
    for net in rest:
        head = head_module(net)
        for name, module in net.named_modules():
            if _inside(module, head) or name not in shared:
                continue
            for p in list(module._parameters):
                module._parameters[p] = shared[name]._parameters[p]
            for b in list(module._buffers):
                module._buffers[b] = shared[name]._buffers[b]


def _inside(module: nn.Module, head: nn.Module) -> bool:
    return any(module is m for m in head.modules())


class JointModule(pl.LightningModule):
    """The tied task models trained together on one batch of every task per step."""

    def __init__(
        self,
        nets: Mapping[str, nn.Module],
        name: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        backbone_lr_factor: float = 1.0,
        **_: Any,
    ) -> None:
        super().__init__()
        # a list, not a ModuleDict: a task may be named like a Module attribute ("type", "train")
        self.names = list(nets)
        self.nets = nn.ModuleList(nets.values())
        self.optimizer_name, self.lr, self.weight_decay = name, lr, weight_decay
        self.momentum, self.backbone_lr_factor = momentum, backbone_lr_factor

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = []
        for task, item in batch.items():
            x, y = split_batch(item)
            losses.append(F.cross_entropy(self.nets[self.names.index(task)](x), y))
        return torch.stack(losses).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        heads = {id(p) for net in self.nets for p in head_module(net).parameters()}
        params = list(self.nets.parameters())  # each shared parameter once
        groups = [
            {"params": [p for p in params if id(p) not in heads], "lr": self.lr * self.backbone_lr_factor},
            {"params": [p for p in params if id(p) in heads]},
        ]
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return getattr(torch.optim, OPTIMIZERS[self.optimizer_name])(groups, **kwargs)


def train_jointly(
    nets: Mapping[str, nn.Module],
    train_loaders: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    optim_cfg: Mapping[str, Any],
) -> None:
    """Tie the nets' backbones and train them together in place (trainer.max_epochs epochs)."""
    tie_backbones(nets)
    module = JointModule(nets, **dict(optim_cfg))
    for net in nets.values():
        net.train()
    trainer = build_trainer(trainer_cfg)  # no validation loader: no validation, whatever limit_val_batches says
    with kept_heap():
        trainer.fit(module, train_dataloaders=CombinedLoader(dict(train_loaders), mode="max_size_cycle"))
    for net in nets.values():
        net.eval()


class MultiTaskTraining(PoolMerge):
    """merge=multitask: not a merge but the baseline merges are compared with. Every task's model
    starts as its fine-tune started (theta_0 and the task's new head) and all train together
    (`train_jointly`) for the job's trainer.max_epochs with the job's optim; the result is one
    backbone with a head per task, as a merge gives. Needs each task's training data (`trains`)."""

    trains = True

    def fit_training(
        self,
        tasks: Sequence[TaskModel],
        train_loaders: Mapping[str, Any],
        trainer_cfg: Mapping[str, Any],
        optim_cfg: Mapping[str, Any],
    ) -> MultiTaskTraining:
        """Train copies of `tasks`' nets (each as it was before fine-tuning) jointly."""
        self.nets_ = {t.name: copy_facts(t.net, copy.deepcopy(t.net)) for t in tasks}
        train_jointly(self.nets_, train_loaders, trainer_cfg, optim_cfg)
        first = next(iter(self.nets_.values()))
        state = first.state_dict()
        self.merged_ = {k: state[k].detach().cpu().clone() for k in backbone_keys(first)}
        self.tasks_ = list(self.nets_)
        return self

    def fit(self, start: Mapping[str, torch.Tensor], tasks: Sequence[TaskModel]) -> MultiTaskTraining:
        raise TypeError("MultiTaskTraining trains on the tasks' training data: call fit_training")

    def task_net(self, task: TaskModel) -> nn.Module:
        net = self.nets_[task.name]
        return copy_facts(net, copy.deepcopy(net)).eval()

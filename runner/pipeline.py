"""run(cfg): the whole experiment, top to bottom. Details live in the packages it calls."""
from __future__ import annotations

import copy
import hashlib
import io
import logging
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runner.config import build, validate
from runner.errors import check
from runner.evaluate import evaluate_model
from runner.evaluate.plots import confusion_matrix_figure
from runner.evaluate.summary import format_table
from runner.tracking import EpochMetricsLogger, flatten, source_tags
from runner.train import train_classifier

log = logging.getLogger(__name__)


@dataclass
class Member:
    name: str
    seed: int
    net: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    probs: torch.Tensor | None = None  # test probabilities, kept so fusion needs no second pass


def state_hash(net: nn.Module) -> str:
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]


def plan_members(cfg: DictConfig) -> list[Member]:
    """Every (model config x seed) of the ensemble, built but not trained: bad configs fail here.

    With `ensemble.shared_init`, all members start from the weights of the first seed's network
    (a prerequisite of weight averaging); their data order still follows their own seed.
    """
    ens = cfg.ensemble or {}
    specs = dict(ens.get("members") or {}) or {None: cfg.model}
    seeds = list(ens.get("seeds") or [cfg.seed])
    check(len(set(seeds)) == len(seeds), "ensemble.seeds", seeds, "distinct integers")
    members = []
    for key, node in specs.items():
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            net = build(node, f"ensemble.members.{key}" if key else "model")
            name = f"{key or type(net).__name__.lower()}-s{seed}"
            members.append(Member(name, seed, net))
    if ens.get("shared_init"):
        check(len(specs) == 1, "ensemble.shared_init", True, "false when members differ in architecture")
        for m in members[1:]:
            m.net.load_state_dict(members[0].net.state_dict())
    for m in members:
        m.net.init_id = state_hash(m.net)
    return members


def run(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Train, evaluate and log one job; returns the flat dict of logged test metrics."""
    validate(cfg)
    datamodule = build(cfg.data, "data")
    members = plan_members(cfg)
    tracker = build(cfg.tracking, "tracking")
    datamodule.setup()  # shape checks against the config, still before any training
    log.info("data: %s  train/val/test = %s", type(datamodule).__name__,
             "/".join(str(len(datamodule.splits[s][1])) for s in ("train", "val", "test")))

    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    test_x, test_y = datamodule.splits["test"]
    latency_x = test_x[: cfg.eval.latency_batch_size]
    results: dict[str, float] = {}
    table: dict[str, dict[str, float]] = {}

    def evaluate(role: str, name: str, model: nn.Module, extra: dict[str, float] | None = None):
        metrics, probs, confusion = evaluate_model(
            model, datamodule.test_dataloader(), datamodule.num_classes, cfg.eval.metrics,
            cfg.eval.ece_bins, latency_x, cfg.eval.latency_repeats)
        metrics = {**{f"test/{k}" if k in cfg.eval.metrics else k: v for k, v in metrics.items()}, **(extra or {})}
        prefix = f"{role}/{name}" if name else role
        results.update({f"{prefix}/{k}": v for k, v in metrics.items()})
        table[prefix] = {k.removeprefix("test/"): v for k, v in metrics.items()}
        tracker.log_child(run_id, prefix, {**params, "role": role, "member": name},
                          {"role": role, "member": name or role}, metrics,
                          {"probs": probs.numpy(), "targets": test_y.numpy()})
        tracker.log_figure(run_id, confusion_matrix_figure(confusion, prefix), f"confusion/{prefix}.png")
        return metrics, probs

    with tracker.run(" ".join(overrides) or "default", params, source_tags(overrides)) as run_id:
        tracker.log_text(run_id, OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)), "config.yaml")
        for member in members:
            log.info("member %s: training %s", member.name, type(member.net).__name__)
            pl.seed_everything(member.seed, verbose=False)
            train_classifier(member.net, datamodule, cfg.trainer, cfg.optim,
                             logger=EpochMetricsLogger(tracker, run_id, prefix=f"member/{member.name}/"))
            member.metrics, member.probs = evaluate("member", member.name, member.net)
        tracker.log_metrics(run_id, results)
    print(format_table(table))
    return results

"""run(cfg): the whole experiment, top to bottom. Details live in the packages it calls."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runner.config import build, validate
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


def plan_members(cfg: DictConfig) -> list[Member]:
    """The ensemble members, built (not trained) so a bad model config fails before training."""
    pl.seed_everything(cfg.seed, verbose=False)
    net = build(cfg.model, "model")
    return [Member(f"{type(net).__name__.lower()}-s{cfg.seed}", cfg.seed, net)]


def run(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """Train, evaluate and log one job; returns the flat dict of logged test metrics."""
    validate(cfg)
    datamodule = build(cfg.data, "data")
    members = plan_members(cfg)
    tracker = build(cfg.tracking, "tracking")
    datamodule.setup()  # shape checks against the config, still before any training
    log.info("data: %s  train/val/test = %s", type(datamodule).__name__,
             "/".join(str(len(datamodule.splits[s][1])) for s in ("train", "val", "test")))

    resolved = OmegaConf.to_container(cfg, resolve=True)
    test_x = datamodule.splits["test"][0][: cfg.eval.latency_batch_size]
    results: dict[str, float] = {}
    table: dict[str, dict[str, float]] = {}
    with tracker.run(" ".join(overrides) or "default", flatten(resolved), source_tags(overrides)) as run_id:
        tracker.log_text(run_id, OmegaConf.to_yaml(resolved), "config.yaml")
        for member in members:
            log.info("member %s: training %s", member.name, type(member.net).__name__)
            pl.seed_everything(member.seed, verbose=False)
            train_classifier(member.net, datamodule, cfg.trainer, cfg.optim,
                             logger=EpochMetricsLogger(tracker, run_id, prefix=f"member/{member.name}/"))
            metrics, _, confusion = evaluate_model(
                member.net, datamodule.test_dataloader(), datamodule.num_classes, cfg.eval.metrics,
                cfg.eval.ece_bins, test_x, cfg.eval.latency_repeats)
            table[member.name] = metrics
            results.update({f"member/{member.name}/test/{k}": v for k, v in metrics.items()})
            tracker.log_figure(run_id, confusion_matrix_figure(confusion, member.name),
                               f"confusion/{member.name}.png")
        tracker.log_metrics(run_id, results)
    print(format_table(table))
    return results

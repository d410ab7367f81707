"""Ensemble members: planned from config (built, not trained), then trained or loaded from the cache."""
from __future__ import annotations

import copy
import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runner.cache import MemberCache, code_digest, digest
from runner.models.adapter import build_model
from runner.errors import check
from runner.train import train_classifier

log = logging.getLogger(__name__)


@dataclass
class Member:
    name: str
    seed: int
    net: nn.Module
    key: str = "model"  # its config key, for errors
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
    check(ens.get("seeds") is None or len(ens.get("seeds")) >= 1, "ensemble.seeds", ens.get("seeds"),
          "a non-empty list of seeds (or null: the top-level seed)")
    seeds = list(ens.get("seeds") or [cfg.seed])
    check(len(set(seeds)) == len(seeds), "ensemble.seeds", seeds, "distinct integers")
    check(int(ens.get("pretrain_epochs") or 0) >= 0, "ensemble.pretrain_epochs", ens.get("pretrain_epochs"),
          "an integer >= 0")
    members = []
    for key, node in specs.items():
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            config_key = f"ensemble.members.{key}" if key else "model"
            net = build_model(node, config_key)
            members.append(Member(f"{key or type(net).__name__.lower()}-s{seed}", seed, net, config_key))
    if ens.get("shared_init"):
        check(len(specs) == 1, "ensemble.shared_init", True, "false when members differ in architecture")
        for m in members[1:]:
            m.net.load_state_dict(members[0].net.state_dict())
    for m in members:
        m.net.init_id = state_hash(m.net)
    return members


def train_member(member: Member, datamodule: Any, trainer: Any, optim: Any, data: Any,
                 cache: MemberCache, logger: Any = None) -> bool:
    """Train `member.net` in place, or load it from the cache; True on a cache hit.

    The cache key covers the data, trainer and optimizer settings, the seed, the initial weights
    and the code of the model, the data source and the runner (runner.cache.code_digest); a long
    member saves a checkpoint every epoch and resumes from it after a kill.
    """
    spec = OmegaConf.to_container(OmegaConf.create({"data": data, "trainer": trainer, "optim": optim}), resolve=True)
    code = code_digest([member.net, datamodule, getattr(datamodule, "inner", None)], training=True)
    key = digest({**spec, "model": type(member.net).__name__, "init": member.net.init_id, "seed": member.seed,
                  "code": code})
    if cache.load(key, member.net):
        log.info("member %s: cache hit %s", member.name, key)
        member.net.eval()
        return True
    log.info("member %s: training %s (cache key %s)", member.name, type(member.net).__name__, key)
    checkpoint, resume_from = cache.checkpoint(key)
    if resume_from:
        log.info("member %s: resuming from checkpoint %s", member.name, resume_from)
    pl.seed_everything(member.seed, verbose=False)
    train_classifier(member.net, datamodule, trainer, optim, logger,
                     callbacks=[checkpoint] if checkpoint else [], ckpt_path=resume_from)
    cache.save(key, member.net, {"member": member.name, "spec": spec, "code": code})
    cache.drop_checkpoint(key)
    return False


def pretrain_shared_start(members: list[Member], cfg: DictConfig, datamodule: Any, cache: MemberCache) -> dict:
    """With `ensemble.pretrain_epochs`, train the shared start for that long and give it to every
    member (the common checkpoint model soups fine-tune from); returns the members' optim config."""
    ens = cfg.ensemble or {}
    epochs = int(ens.get("pretrain_epochs") or 0)
    if not (ens.get("shared_init") and epochs):
        return cfg.optim
    first = members[0]
    start = Member(f"pretrain-s{first.seed}", first.seed, copy.deepcopy(first.net))
    start.net.init_id = first.net.init_id
    train_member(start, datamodule, {**cfg.trainer, "max_epochs": epochs}, cfg.optim, cfg.data, cache)
    for m in members:
        m.net.load_state_dict(start.net.state_dict())
        m.net.init_id = state_hash(m.net)
    lr = ens.get("finetune_lr")
    return {**cfg.optim, "lr": lr} if lr else cfg.optim

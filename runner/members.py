"""Ensemble members: planned from config (built, not trained), then trained or loaded from the cache.

Each member may have its own training settings (`ensemble.finetune[i]`: optimizer and training-data
overrides), so members fine-tuned from one shared start differ by more than their data order.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runner.cache import MemberCache, code_digest, digest
from runner.config import OptimConf, build
from runner.data import as_source
from runner.errors import ConfigError, check
from runner.models import facts
from runner.models.adapter import build_model
from runner.models.facts import state_hash
from runner.progress import MemberProgress
from runner.train import train_classifier

log = logging.getLogger(__name__)
FINETUNE_KEYS = ("optim", "data")
# Data keys a member may set for itself: how it sees the training split, never the splits themselves
# (split and dataset seeds, fractions, scaling stay the job's, so val and test are the same for all).
FINETUNE_DATA_KEYS = ("batch_size", "train_transforms", "num_workers")
OPTIM_KEYS = tuple(f.name for f in fields(OptimConf))


@dataclass
class Member:
    name: str
    seed: int
    net: nn.Module
    key: str = "model"  # its config key, for errors
    metrics: dict[str, float] = field(default_factory=dict)
    probs: torch.Tensor | None = None  # test probabilities, kept so fusion needs no second pass
    optim: dict[str, Any] = field(default_factory=dict)  # ensemble.finetune[i].optim, over the job's optim
    data: dict[str, Any] = field(default_factory=dict)  # ensemble.finetune[i].data, over the job's data
    datamodule: Any = None  # built from the job's data config with `data`; None: the job's datamodule
    train_s: float = float("nan")  # seconds its training took (on a cache hit: when it was trained)

    @property
    def init_id(self) -> str | None:
        """The hash of the weights the member starts from (runner.models.facts, not on its net)."""
        return facts.init_id(self.net)


def plan_members(cfg: DictConfig, data: Mapping[str, Any] | None = None, model_name: str | None = None) -> list[Member]:
    """Every (model config x seed) of the ensemble, built but not trained: bad configs fail here.

    `ensemble.size: n` (with `seeds` null) seeds the members `seed * n + i`: jobs with seed 0, 1, 2
    train disjoint ensembles, so a sweep over `seed` gives independent replicates.
    With `ensemble.shared_init`, all members start from the weights of the first seed's network
    (a prerequisite of weight averaging); their data order still follows their own seed.
    `ensemble.finetune` gives members their own settings (see `plan_finetune`); a member with data
    overrides gets a datamodule built from `data`, the data config as composed (default: cfg.data;
    the pipeline passes the user's, without what the data holds). Members are named
    `<name>-s<seed>`: the ensemble's key, else `model_name` (the model option picked, e.g. minilm), else
    the model's class.
    """
    ens = cfg.ensemble or {}
    specs = dict(ens.get("members") or {}) or {None: cfg.model}
    check(
        ens.get("seeds") is None or len(ens.get("seeds")) >= 1,
        "ensemble.seeds",
        ens.get("seeds"),
        "a non-empty list of seeds (or null: the top-level seed)",
    )
    size = ens.get("size")
    check(
        size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 1),
        "ensemble.size",
        size,
        "null or an integer >= 1 (members seeded seed * size + i, i < size)",
    )
    check(
        size is None or ens.get("seeds") is None,
        "ensemble.seeds",
        ens.get("seeds"),
        f"null when ensemble.size is set ({size}: the seeds are seed * size + i)",
    )
    seeds = list(ens.get("seeds") or ([cfg.seed * size + i for i in range(size)] if size else [cfg.seed]))
    check(
        all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
        "ensemble.seeds",
        seeds,
        "a list of integers >= 0",
    )
    check(len(set(seeds)) == len(seeds), "ensemble.seeds", seeds, "distinct integers")
    check(
        int(ens.get("pretrain_epochs") or 0) >= 0,
        "ensemble.pretrain_epochs",
        ens.get("pretrain_epochs"),
        "an integer >= 0",
    )
    lr = ens.get("finetune_lr")
    check(lr is None or _number(lr) and lr > 0, "ensemble.finetune_lr", lr, "null (the job's optim.lr) or a float > 0")
    members = []
    for key, node in specs.items():
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            config_key = f"ensemble.members.{key}" if key else "model"
            net = build_model(node, config_key)
            name = key or model_name or type(net).__name__.lower()
            members.append(Member(f"{name}-s{seed}", seed, net, config_key))
    if ens.get("shared_init"):
        check(len(specs) == 1, "ensemble.shared_init", True, "false when members differ in architecture")
        for m in members[1:]:
            m.net.load_state_dict(members[0].net.state_dict())
    for m in members:
        facts.set_init_id(m.net, state_hash(m.net))
    plan_finetune(members, cfg, data)
    return members


def plan_finetune(members: list[Member], cfg: DictConfig, data: Mapping[str, Any] | None = None) -> None:
    """Validate `ensemble.finetune` (null, or one entry per member in member order, each a dict with
    optional `optim` and `data` overrides) and give each member its settings; members with the same
    data overrides share one datamodule (built here, loaded when first used)."""
    entries = (cfg.ensemble or {}).get("finetune")
    if entries is None:
        return
    entries = OmegaConf.to_container(entries, resolve=True) if OmegaConf.is_config(entries) else entries
    names = [m.name for m in members]
    check(
        isinstance(entries, list) and len(entries) == len(members),
        "ensemble.finetune",
        entries if not isinstance(entries, list) else f"{len(entries)} entries",
        f"null or a list of {len(members)} entries (dicts with optional optim and data), one per member in "
        f"order {names}",
    )
    datamodules: dict[str, Any] = {}
    for i, (member, entry) in enumerate(zip(members, entries)):
        key = f"ensemble.finetune[{i}]"
        entry = {} if entry is None else entry
        check(isinstance(entry, dict), key, entry, "null or a dict with optional keys optim and data")
        for name, value in entry.items():
            check(name in FINETUNE_KEYS, f"{key}.{name}", value, f"the keys {list(FINETUNE_KEYS)}")
            check(value is None or isinstance(value, dict), f"{key}.{name}", value, "null or a dict of overrides")
        optim, overrides = entry.get("optim") or {}, entry.get("data") or {}
        for name, value in optim.items():
            check(name in OPTIM_KEYS, f"{key}.optim.{name}", value, f"keys of optim: {list(OPTIM_KEYS)}")
            text = name in ("name", "finetune")
            check(
                isinstance(value, str) if text else _number(value),
                f"{key}.optim.{name}",
                value,
                "a name" if text else "a number",
            )
        with _renamed("optim", f"{key}.optim"):
            OptimConf(**{**cfg.optim, **optim})  # its checks: optimizer name, lr > 0, weight_decay >= 0
        for name, value in overrides.items():
            check(
                name in FINETUNE_DATA_KEYS,
                f"{key}.data.{name}",
                value,
                f"training-time data keys {list(FINETUNE_DATA_KEYS)} (the splits stay the job's)",
            )
        member.optim, member.data = optim, overrides
        if overrides:
            node = OmegaConf.merge(OmegaConf.to_container(cfg.data, resolve=True) if data is None else data, overrides)
            ident = json.dumps(overrides, sort_keys=True, default=str)
            with _renamed("data", f"{key}.data"):
                member.datamodule = datamodules.get(ident) or as_source(build(node, "data"))
            datamodules[ident] = member.datamodule


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextmanager
def _renamed(prefix: str, to: str) -> Iterator[None]:
    """A ConfigError raised for `prefix...` (e.g. optim.lr) re-raised for `to...` (ensemble.finetune[1].optim.lr)."""
    try:
        yield
    except ConfigError as e:
        key = to + e.key[len(prefix) :] if e.key.startswith(prefix) else f"{to} ({e.key})"
        raise ConfigError(key, e.value, e.allowed) from None


def shared_start(members: list[Member]) -> dict[str, torch.Tensor]:
    """A copy of the weights every member starts from (after `pretrain_shared_start`, before training):
    the theta_0 that weight-space merging (runner.fuse.merge) takes task vectors from."""
    return facts.shared_start([m.net for m in members], members[0].name)


def member_key(member: Member, datamodule: Any, trainer: Any, optim: Any, data: Any) -> str:
    """The member cache key: the effective data, trainer and optimizer settings (the member's own over
    the job's), the model class, its initial weights, the seed and the code that trains it."""
    return _member_key(member, datamodule, trainer, optim, data)[0]


def _member_key(member: Member, datamodule: Any, trainer: Any, optim: Any, data: Any) -> tuple:
    """(key, spec, code, datamodule, optim) as train_member uses them."""
    if member.optim:
        optim = {**optim, **member.optim}
    if member.data:
        data = OmegaConf.merge(
            OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else data, member.data
        )
    if member.datamodule is not None:
        datamodule = member.datamodule
    spec = OmegaConf.to_container(OmegaConf.create({"data": data, "trainer": trainer, "optim": optim}), resolve=True)
    code = code_digest([member.net, datamodule, getattr(datamodule, "inner", None)], training=True)
    key = digest(
        {**spec, "model": type(member.net).__name__, "init": member.init_id, "seed": member.seed, "code": code}
    )
    return key, spec, code, datamodule, optim


def cache_entry(key: str, sha256: str | None) -> str | None:
    """What identifies a member's cached weights: its cache key and the sha256 of the weights file (a
    member whose entry was rebuilt, or stored first by another job, has other weights); None: not cached.
    Its logged model is tagged with it, so a later job's cache hit points at that model."""
    return f"{key}:{sha256[:16]}" if sha256 else None


def train_member(
    member: Member, datamodule: Any, trainer: Any, optim: Any, data: Any, cache: MemberCache, logger: Any = None
) -> bool:
    """Train `member.net` in place, or load it from the cache; True on a cache hit.

    The member's own settings apply over the job's: `member.optim` over `optim`, `member.data` over
    `data` (trained on `member.datamodule`). The cache key covers the effective data, trainer and
    optimizer settings, the seed, the initial weights and the code of the model, the data source and
    the runner (runner.cache.code_digest); a long member saves a checkpoint every epoch and resumes
    from it after a kill.
    """
    key, spec, code, datamodule, optim = _member_key(member, datamodule, trainer, optim, data)
    meta = cache.load(key, member.net)
    if meta is not None:
        log.info("member %s: cache hit %s", member.name, key)
        member.net.eval()
        if logger is not None and hasattr(logger, "replay"):  # its learning curves, logged as when it trained
            logger.replay(meta.get("history", []))
        member.train_s = float(meta.get("train_s", float("nan")))
        facts.set_cache_entry(member.net, cache_entry(key, meta.get("sha256")))
        return True
    log.info("member %s: training %s (cache key %s)", member.name, type(member.net).__name__, key)
    checkpoint, resume_from = cache.checkpoint(key)
    if resume_from:
        log.info("member %s: resuming from checkpoint %s", member.name, resume_from)
    pl.seed_everything(member.seed, verbose=False)
    started = time.perf_counter()
    progress = MemberProgress(member.name)
    train_classifier(
        member.net,
        datamodule,
        trainer,
        optim,
        logger,
        callbacks=[progress, checkpoint] if checkpoint else [progress],
        ckpt_path=resume_from,
    )
    if hasattr(logger, "read_back"):  # DDP: the curves rank 0 logged in its own process
        logger.read_back()
    member.train_s = time.perf_counter() - started  # a resumed member: since the resume
    sha256 = cache.save(
        key,
        member.net,
        {
            "member": member.name,
            "spec": spec,
            "code": code,
            "train_s": member.train_s,
            "history": getattr(logger, "history", []),
        },
    )
    facts.set_cache_entry(member.net, cache_entry(key, sha256))
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
    facts.set_init_id(start.net, first.init_id)
    train_member(start, datamodule, {**cfg.trainer, "max_epochs": epochs}, cfg.optim, cfg.data, cache)
    for m in members:
        m.net.load_state_dict(start.net.state_dict())
        facts.set_init_id(m.net, state_hash(m.net))
    lr = ens.get("finetune_lr")
    return {**cfg.optim, "lr": lr} if lr else cfg.optim

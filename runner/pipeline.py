"""run(cfg): the whole experiment, top to bottom. Details live in the packages it calls."""
from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runner.cache import MemberCache, digest
from runner.compress import CompressContext, build_recipe, compression_report
from runner.config import build, validate
from runner.errors import check
from runner.models import lit
from runner.timing import process_start_time
from runner.evaluate.recorder import Recorder
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
            members.append(Member(f"{key or type(net).__name__.lower()}-s{seed}", seed, net))
    if ens.get("shared_init"):
        check(len(specs) == 1, "ensemble.shared_init", True, "false when members differ in architecture")
        for m in members[1:]:
            m.net.load_state_dict(members[0].net.state_dict())
    for m in members:
        m.net.init_id = state_hash(m.net)
    return members


def train_member(member: Member, cfg: DictConfig, datamodule, cache: MemberCache, logger) -> bool:
    """Train (or load from the cache) one member; True on a cache hit."""
    spec = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["data", "trainer", "optim"]), resolve=True)
    key = digest({**spec, "model": type(member.net).__name__, "init": member.net.init_id, "seed": member.seed})
    if cache.load(key, member.net):
        log.info("member %s: cache hit %s", member.name, key)
        member.net.eval()
        return True
    log.info("member %s: training %s (cache key %s)", member.name, type(member.net).__name__, key)
    checkpoint, resume_from = cache.checkpoint(key)
    if resume_from:
        log.info("member %s: resuming from checkpoint %s", member.name, resume_from)
    pl.seed_everything(member.seed, verbose=False)
    train_classifier(member.net, datamodule, cfg.trainer, cfg.optim, logger,
                     callbacks=[checkpoint] if checkpoint else [], ckpt_path=resume_from)
    cache.save(key, member.net, {"member": member.name, "spec": spec})
    cache.drop_checkpoint(key)
    return False


def run(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = (), parent_id: str | None = None,
        tags: dict[str, str] | None = None) -> dict[str, float]:
    """Train, evaluate and log one job; returns the flat dict of logged test metrics."""
    validate(cfg)
    datamodule = build(cfg.data, "data")
    members = plan_members(cfg)
    recipe = build_recipe(cfg.compress)
    tracker = build(cfg.tracking, "tracking")
    datamodule.setup()  # shape checks against the config, still before any training
    for member in members:
        recipe.check(member.net, datamodule.num_classes, ensemble=False)

    job = {"role": "job", "job_hash": digest(OmegaConf.to_container(OmegaConf.masked_copy(
        cfg, [k for k in cfg if k not in ("tracking", "cache")]), resolve=True))}
    if cfg.cache.skip_finished and (done := tracker.find_runs(job, "FINISHED")):
        log.info("skipping: this config already finished as MLflow run %s", done[0].info.run_id)
        return dict(done[0].data.metrics)
    for stale in tracker.find_runs(job, "RUNNING"):  # a killed job (SIGKILL) never said goodbye
        tracker.end_run(stale.info.run_id, "FAILED")

    cache = MemberCache(cfg.cache.dir)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    run_tags = {**source_tags(overrides), **job, **(tags or {})}
    name = " ".join(o for o in overrides if not o.startswith(("tracking.", "cache.", "hydra"))) or "default"
    with tracker.run(name, params, run_tags, parent_id) as run_id:
        tracker.log_text(run_id, OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)), "config.yaml")
        recorder = Recorder(tracker, run_id, datamodule, cfg.eval, params, run_tags)
        for member in members:
            start = time.perf_counter()
            hit = train_member(member, cfg, datamodule, cache,
                               EpochMetricsLogger(tracker, run_id, prefix=f"member/{member.name}/"))
            train_s = time.perf_counter() - start
            member.metrics, member.probs = recorder.evaluate(
                "member", member.name, member.net, derive=lambda _, t=train_s: {"train_s": t},
                tags={"cache": "hit" if hit else "miss"})
        for member in members if recipe else []:
            log.info("member %s: compressing with %s", member.name, recipe)
            small = recipe.apply(member.net, CompressContext(datamodule, cfg.trainer, cfg.optim, teacher=member.net))
            recorder.evaluate("compressed", member.name, small,
                              derive=lambda metrics, base=member.metrics: compression_report(base, metrics))
        timing = {"timing/total_s": time.time() - process_start_time(),
                  "timing/mlflow_setup_s": tracker.setup_s, "timing/mlflow_log_s": tracker.busy_s - tracker.setup_s}
        if lit.first_step_at:
            timing["timing/startup_s"] = lit.first_step_at - process_start_time()
        tracker.log_metrics(run_id, {**recorder.results, **timing})
    print(format_table(recorder.table))
    log.info("wall time %.1f s; MLflow: %.2f s opening the store, %.2f s logging; first training step after %.1f s",
             *(timing.get(f"timing/{k}", float("nan")) for k in ("total_s", "mlflow_setup_s", "mlflow_log_s", "startup_s")))
    return recorder.results

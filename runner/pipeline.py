"""run(cfg): the whole experiment, top to bottom, as named stages. Details live in the packages they call.

plan (build and check everything, no training) -> members (train or load, evaluate on test) -> fuse
(fit on val, evaluate on test; the objective on val) -> compress (every member, then fuse the
compressed ones) -> log (the job's metrics, timing and summary). Each stage takes and returns plain
results; none asks a strategy or recipe for its type.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runner.cache import MemberCache, code_digest, digest
from runner.compress import CompressContext, Recipe, build_recipe, compression_report
from runner.config import build, validate
from runner.data import DataSpec, as_source
from runner.data.sources import data_spec, with_data_values
from runner.device import data_on_device, job_device, on_device
from runner.evaluate import predict_proba
from runner.fuse import Fusion, gain_over_best
from runner.job import finished, job_run, job_timing, log_job, report, start_job
from runner.lm import is_lm, run_lm
from runner.measure import PeakMemory
from runner.members import Member, plan_members, pretrain_shared_start, train_member
from runner.models.adapter import check_forward
from runner.pool import is_pool, run_pool
from runner.recorder import Recorder
from runner.tracking import (
    EpochMetricsLogger,
    Tracker,
)
from runner.train import check_devices

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything a job builds from its config and checks before any training."""

    cfg: DictConfig  # the job's config with what the data holds (with_data_values); the caller's is untouched
    datamodule: Any
    spec: DataSpec
    members: list[Member]  # built, not trained
    strategy: Fusion | None
    recipe: Recipe
    cache: MemberCache
    code: dict[str, str]  # the code the job hash covers (runner.cache.code_digest)
    job_tags: dict[str, str]  # role and job_hash: what finds this config's earlier runs

    @property
    def nets(self) -> list[nn.Module]:
        return [m.net for m in self.members]


@dataclass
class MemberResults:
    """The members, trained on train (or loaded from the cache), with their test metrics and probabilities."""

    members: list[Member]

    @property
    def nets(self) -> list[nn.Module]:
        return [m.net for m in self.members]

    @property
    def metrics(self) -> list[dict[str, float]]:
        return [m.metrics for m in self.members]

    def test_probs(self) -> torch.Tensor:
        return torch.stack([m.probs for m in self.members])  # (M, N, C)


@dataclass
class FusionResult:
    model: nn.Module | None  # the fused model; None without a strategy
    objective: dict[str, float]  # objective/val_acc: what a sweeper maximizes (val only, never test)


@dataclass
class CompressionResult:
    models: list[nn.Module] = field(default_factory=list)  # one compressed copy per member, in member order
    test_probs: list[torch.Tensor] = field(default_factory=list)


def run(
    cfg: DictConfig,
    overrides: list[str] | tuple[str, ...] = (),
    parent_id: str | None = None,
    tags: dict[str, str] | None = None,
    tracker: Tracker | None = None,
    choices: dict[str, str] | None = None,
) -> dict[str, float]:
    """Train, compress, fuse, evaluate and log one job; returns the flat dict of its metrics: every
    model's under `<role>/<name>/` (also in the child runs) and the job run's (Recorder.job_metrics).
    A job skipped because it already finished returns what its run logged. `cfg` is not changed.

    `tracker` defaults to the one `cfg.tracking` builds (the command line builds it earlier);
    `choices` (`choice/<group>`: the option picked) are logged as params beside the config.
    """
    if is_pool(cfg):  # a pool of tasks merged into one model: runner/pool.py
        return run_pool(cfg, overrides, parent_id, tags, tracker, choices)
    if is_lm(cfg):  # a causal language model evaluated and compressed: runner/lm.py
        return run_lm(cfg, overrides, parent_id, tags, tracker, choices)
    started = start_job()
    job = plan(cfg, (choices or {}).get("choice/model"))  # every bad value fails here, before any training
    tracker = tracker or build(job.cfg.tracking, "tracking")
    busy_before, setup_before = tracker.busy_s, tracker.setup_s  # a tracker may serve several jobs
    if (done := finished(job.cfg.cache.skip_finished, job.job_tags, tracker)) is not None:
        return done
    resolved = OmegaConf.to_container(job.cfg, resolve=True)
    with job_run(tracker, resolved, job.code, job.job_tags, overrides, parent_id, tags, choices) as (
        run_id,
        params,
        run_tags,
    ):
        device = job_device(job.cfg.trainer)  # evaluation, fusion and the objective run there too
        data_on_device(job.datamodule, device, job.cfg.trainer)
        recorder = Recorder(tracker, run_id, job.datamodule, job.cfg.eval, params, run_tags, device)
        members = train_members(job, recorder)
        fused = fuse(job, members, recorder)
        compress(job, members, fused, recorder)
        timing = job_timing(tracker, started, busy_before, setup_before)
        summary = log_job(recorder, job_metrics(recorder, fused), timing)
    report(summary)
    return {**recorder.results, **recorder.job_metrics()}


def plan(cfg: DictConfig, model_name: str | None = None) -> Plan:
    """Build everything from config and check it, no training yet: data, members (one forward pass
    of each on real inputs), strategy, recipe, devices, cache; and the hash of the config and code."""
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    datamodule = as_source(build(cfg.data, "data"))
    spec = data_spec(datamodule)  # loads the data
    composed_data = OmegaConf.to_container(cfg.data, resolve=True)  # members with their own data settings build on it
    job_cfg = with_data_values(cfg, datamodule)  # model configs read ${data.num_classes} etc. from this copy
    members = plan_members(job_cfg, composed_data, model_name)
    for member in members:  # one forward pass of every member on real inputs
        check_forward(member.net, spec.example, spec.num_classes, member.key, spec.input_spec)
    strategy = build(job_cfg.fuse, "fuse") if job_cfg.fuse else None
    if strategy:
        strategy.check_members([m.net for m in members], spec)
    recipe = build_recipe(job_cfg.compress)
    for member in members:
        recipe.check(member.net, spec, ensemble=strategy is not None, members=len(members))
    check_devices(job_cfg.trainer)
    cache = MemberCache(job_cfg.cache.dir)
    cache.check_writable()
    # the same config run by the same code, that is: the runner's and the user's own modules
    code = code_digest(
        [*(m.net for m in members), datamodule, getattr(datamodule, "inner", None), *recipe.steps, strategy]
    )
    config = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k not in ("tracking", "cache")])
    job_hash = digest({"config": OmegaConf.to_container(config, resolve=True), "code": code})
    return Plan(
        job_cfg, datamodule, spec, members, strategy, recipe, cache, code, {"role": "job", "job_hash": job_hash}
    )


def train_members(job: Plan, recorder: Recorder) -> MemberResults:
    """Members trained on train (or loaded from the cache), each evaluated on test in its own run."""
    cfg, tracker = job.cfg, recorder.tracker
    optim = pretrain_shared_start(job.members, cfg, job.datamodule, job.cache)
    if job.strategy:  # before they train: weight-space merging keeps the members' shared start
        job.strategy.prepare(job.nets)
    for member in job.members:
        # the member's own run is open while it trains: its learning curves (train/loss, val/acc
        # per epoch) go there live, or are replayed from the cache on a hit
        with tracker.run(*recorder.child("member", member.name), parent_id=recorder.run_id, wait=False) as member_run:
            start = time.perf_counter()
            hit = train_member(
                member, job.datamodule, cfg.trainer, optim, cfg.data, job.cache, EpochMetricsLogger(tracker, member_run)
            )
            # train_s: what training took, also on a cache hit (then cache_load_s: what the hit took)
            times = {"train_s": member.train_s, **({"cache_load_s": time.perf_counter() - start} if hit else {})}
            member.metrics, member.probs = recorder.evaluate(
                "member",
                member.name,
                member.net,
                tags={"cache": "hit" if hit else "miss"},
                derive=lambda _, t=times: dict(t),
                run_id=member_run,
            )
    return MemberResults(job.members)


def fuse(job: Plan, members: MemberResults, recorder: Recorder) -> FusionResult:
    """The strategy fitted on val only and evaluated on test (output-level strategies reuse the
    members' test outputs); what the fit cost (`fused/fit_s`, `fused/fit_peak_mb`: the resident memory
    it added); the objective: val accuracy of the fused model, else of the best member."""
    strategy, fused = job.strategy, None
    if strategy:
        with on_device(members.nets, recorder.device), PeakMemory() as peak:
            started = time.perf_counter()
            strategy.fit(members.nets, job.datamodule.val_dataloader())
            fit = {"fit_s": time.perf_counter() - started}
        fit["fit_peak_mb"] = peak.mb
        fused = strategy.as_module()
        recorder.evaluate(
            "fused",
            "",
            fused,
            derive=lambda m: {**gain_over_best(m, members.metrics), **strategy.stats(), **fit},
            probs=strategy.fused_test_probs(members.test_probs()),
        )
    # never a test number; output-level fusion reuses the val outputs it was fitted on
    kept = strategy.val_outputs() if strategy else None
    if kept is not None:
        val = [kept]
    else:
        nets = [fused] if fused is not None else members.nets
        with on_device(nets, recorder.device):
            val = [predict_proba(net, job.datamodule.val_dataloader()) for net in nets]
    objective = {"objective/val_acc": max(float((p.argmax(1) == y).float().mean()) for p, y in val)}
    recorder.results.update(objective)
    return FusionResult(fused, objective)


def compress(job: Plan, members: MemberResults, fused: FusionResult, recorder: Recorder) -> CompressionResult:
    """Every member compressed (the uncompressed ones stay for comparison) and evaluated on test; the
    compressed members fused again where the strategy fuses any model (at the output)."""
    cfg, recipe, out = job.cfg, job.recipe, CompressionResult()
    for member in members.members if recipe else []:
        log.info("member %s: compressing with %s", member.name, recipe)
        context = CompressContext(
            job.datamodule, cfg.trainer, cfg.optim, teacher=member.net, ensemble=fused.model, members=members.nets
        )
        small = recipe.apply(member.net, context)
        _, probs = recorder.evaluate(
            "compressed",
            member.name,
            small,
            derive=lambda m, base=member.metrics: {**compression_report(base, m), **recipe.stats_},
        )
        out.models.append(small)
        out.test_probs.append(probs)
    if out.models and job.strategy is not None and job.strategy.fuses_outputs:
        with on_device(out.models, recorder.device):
            again = build(cfg.fuse, "fuse").fit(out.models, job.datamodule.val_dataloader())
        recorder.evaluate(
            "fused_compressed",
            "",
            again.as_module(),
            derive=lambda m: gain_over_best(m, members.metrics),
            probs=again.fused_test_probs(torch.stack(out.test_probs)),
        )
    return out


def job_metrics(recorder: Recorder, fused: FusionResult) -> dict[str, float]:
    """The job run's metrics: members' mean/std/best, fused, and the objective."""
    return {**recorder.job_metrics(), **fused.objective}

"""run(cfg): the whole experiment, top to bottom. Details live in the packages it calls."""

from __future__ import annotations

import json
import logging
import tempfile
import time

import torch
from omegaconf import DictConfig, OmegaConf

from runner.cache import MemberCache, code_digest, digest
from runner.compress import CompressContext, build_recipe, compression_report
from runner.config import build, validate
from runner.data import as_source, describe_data
from runner.device import data_on_device, job_device, on_device
from runner.evaluate import predict_proba
from runner.evaluate.recorder import Recorder
from runner.evaluate.summary import format_table
from runner.fuse import OutputFusion, gain_over_best
from runner.members import plan_members, pretrain_shared_start, shared_start, train_member
from runner.models import lit
from runner.models.adapter import check_forward
from runner.timing import process_start_time
from runner.tracking import (
    BackgroundTracker,
    EpochMetricsLogger,
    RunQueryError,
    Tracker,
    download_artifact,
    flatten,
    source_tags,
)
from runner.train import check_devices

log = logging.getLogger(__name__)
_jobs_in_process = 0  # a multirun with the basic launcher runs several jobs in one process


SUMMARY = "summary.txt"


def stored_summary(uri: str, run_id: str) -> str:
    """The summary table a finished job logged (jobs before it was logged: a line saying so)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return download_artifact(uri, run_id, SUMMARY, tmp).read_text().rstrip("\n")
        except RunQueryError:
            return f"(run {run_id} has no {SUMMARY}: its metrics are in MLflow)"


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
    A job skipped because it already finished returns what its run logged.

    `tracker` defaults to the one `cfg.tracking` builds (the command line builds it earlier);
    `choices` (`choice/<group>`: the option picked) are logged as params beside the config.
    """
    global _jobs_in_process
    _jobs_in_process += 1
    started = process_start_time() if _jobs_in_process == 1 else time.time()  # later jobs of a multirun
    # 1. Build everything from config; every bad value fails here, before any training.
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    datamodule = as_source(build(cfg.data, "data"))
    composed_data = OmegaConf.to_container(cfg.data, resolve=True)  # members with their own data settings build on it
    spec = describe_data(cfg, datamodule)  # loads the data; model configs read ${data.num_classes} etc.
    members = plan_members(cfg, composed_data, (choices or {}).get("choice/model"))
    for member in members:  # one forward pass of every member on real inputs
        check_forward(member.net, spec.example, spec.num_classes, member.key, spec.input_spec)
    strategy = build(cfg.fuse, "fuse") if cfg.fuse else None
    if strategy:
        strategy.check_members([m.net for m in members], spec)
    recipe = build_recipe(cfg.compress)
    for member in members:
        recipe.check(member.net, spec, ensemble=strategy is not None, members=len(members))
    check_devices(cfg.trainer)
    cache = MemberCache(cfg.cache.dir)
    cache.check_writable()
    tracker = tracker or build(cfg.tracking, "tracking")
    busy_before, setup_before = tracker.busy_s, tracker.setup_s  # a tracker may serve several jobs

    # 2. A job whose exact config already finished is not run again.
    # ... the same config run by the same code, that is: the runner's and the user's own modules.
    code = code_digest(
        [*(m.net for m in members), datamodule, getattr(datamodule, "inner", None), *recipe.steps, strategy]
    )
    job = {
        "role": "job",
        "job_hash": digest(
            {
                "config": OmegaConf.to_container(
                    OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("tracking", "cache")]), resolve=True
                ),
                "code": code,
            }
        ),
    }
    if cfg.cache.skip_finished and (done := tracker.find_runs(job, "FINISHED")):
        log.info("skipping: this config already finished as MLflow run %s; its summary:", done[0].run_id)
        print(stored_summary(tracker.uri, done[0].run_id))
        return dict(done[0].metrics)
    for stale in tracker.find_runs(job, "RUNNING"):  # a job killed by SIGKILL never said goodbye
        tracker.end_run(stale.run_id, "FAILED")

    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = {**flatten(resolved), **(choices or {})}
    run_tags = {**source_tags(overrides), **job, **(tags or {})}
    name = " ".join(o for o in overrides if not o.startswith(("tracking.", "cache.", "hydra"))) or "default"
    with tracker.run(name, params, run_tags, parent_id) as run_id:
        tracker.log_text(run_id, OmegaConf.to_yaml(resolved), "config.yaml")
        tracker.log_text(run_id, json.dumps(code, indent=1), "code.json")  # what the job hash covered
        device = job_device(cfg.trainer)  # evaluation, fusion and the objective run there too
        data_on_device(datamodule, device, cfg.trainer)
        recorder = Recorder(tracker, run_id, datamodule, cfg.eval, params, run_tags, device)

        # 3. Members: trained on train (or loaded from the cache), evaluated on test.
        optim = pretrain_shared_start(members, cfg, datamodule, cache)
        if hasattr(strategy, "set_start"):  # weight-space merging takes task vectors from the members' shared start
            strategy.set_start(shared_start(members))
        for member in members:
            # the member's own run is open while it trains: its learning curves (train/loss, val/acc
            # per epoch) go there live, or are replayed from the cache on a hit
            with tracker.run(*recorder.child("member", member.name), parent_id=run_id, wait=False) as member_run:
                start = time.perf_counter()
                hit = train_member(
                    member, datamodule, cfg.trainer, optim, cfg.data, cache, EpochMetricsLogger(tracker, member_run)
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
        singles = [m.metrics for m in members]

        # 4. Fusion: fitted on val only; output-level strategies reuse the members' test outputs.
        fused = None
        if strategy:
            with on_device([m.net for m in members], device):
                strategy.fit([m.net for m in members], datamodule.val_dataloader())
            fused = strategy.as_module()
            recorder.evaluate(
                "fused",
                "",
                fused,
                derive=lambda m: {**gain_over_best(m, singles), **strategy.stats()},
                probs=(
                    strategy.combine(torch.stack([m.probs for m in members]))
                    if isinstance(strategy, OutputFusion)
                    else None
                ),
            )

        # The value a sweeper (Optuna) maximizes: validation accuracy of the fused model, else of the
        # best member; never a test number. Output-level fusion reuses the val outputs it was fitted on.
        if isinstance(strategy, OutputFusion):
            val = [(strategy.combine(strategy.val_probs_), strategy.val_y_)]
        else:
            nets = [fused] if fused is not None else [m.net for m in members]
            with on_device(nets, device):
                val = [predict_proba(net, datamodule.val_dataloader()) for net in nets]
        objective = {"objective/val_acc": max(float((p.argmax(1) == y).float().mean()) for p, y in val)}
        recorder.results.update(objective)

        # 5. Compression of every member (the uncompressed ones stay for comparison).
        compressed = []
        for member in members if recipe else []:
            log.info("member %s: compressing with %s", member.name, recipe)
            small = recipe.apply(
                member.net,
                CompressContext(
                    datamodule,
                    cfg.trainer,
                    cfg.optim,
                    teacher=member.net,
                    ensemble=fused,
                    members=[m.net for m in members],
                ),
            )
            _, probs = recorder.evaluate(
                "compressed",
                member.name,
                small,
                derive=lambda m, base=member.metrics: {**compression_report(base, m), **recipe.stats_},
            )
            compressed.append((small, probs))
        if compressed and isinstance(strategy, OutputFusion):  # any model type fuses at the output
            with on_device([net for net, _ in compressed], device):
                again = build(cfg.fuse, "fuse").fit([net for net, _ in compressed], datamodule.val_dataloader())
            recorder.evaluate(
                "fused_compressed",
                "",
                again.as_module(),
                derive=lambda m: gain_over_best(m, singles),
                probs=again.combine(torch.stack([p for _, p in compressed])),
            )

        setup_s = tracker.setup_s - setup_before  # what this process waited for MLflow, in seconds
        timing = {
            "timing/total_s": time.time() - started,
            "timing/mlflow_setup_s": setup_s,
            "timing/mlflow_log_s": tracker.busy_s - busy_before - setup_s,
        }
        if isinstance(tracker, BackgroundTracker):  # the worker's own time, spent alongside this process
            timing["timing/mlflow_worker_s"] = tracker.time_spent()[0]  # since it started (jobs may share it)
        if lit.first_step_at and _jobs_in_process == 1:  # command -> first training step
            timing["timing/startup_s"] = lit.first_step_at - started
        tracker.log_metrics(run_id, {**recorder.job_metrics(), **objective, **timing})
        summary = format_table(recorder.table)
        tracker.log_text(run_id, summary + "\n", SUMMARY)  # what the console showed; printed again on a skip
    print(summary)
    first_step = (
        f"; first training step after {timing['timing/startup_s']:.1f} s" if "timing/startup_s" in timing else ""
    )
    log.info(
        "wall time %.1f s; waited for MLflow: %.2f s opening the store, %.2f s logging%s",
        timing["timing/total_s"],
        timing["timing/mlflow_setup_s"],
        timing["timing/mlflow_log_s"],
        first_step,
    )
    return {**recorder.results, **recorder.job_metrics()}

"""A pool of tasks merged into one model (FusionBench's setting): one pretrained start, K tasks (each a
data config with its own classes), one member fine-tuned per task from that start with its own new head
(or a fine-tuned checkpoint per task, loaded instead), the backbones merged by a method of
runner.fuse.multitask (`merge=`), and the merged backbone evaluated on every task with that task's head.

    python -m runner experiment=pool_text merge=regmean

A job of this kind is chosen by `tasks` (name -> {data: <a data config>, checkpoint: null}); the
top-level `data` is unused (each task's data replaces it, model configs read `${data.num_classes}` of
the task they are built for). Logged per task: `member/<task>/test/*` (the task's own fine-tune),
`fused/<task>/test/*` (the merged model with the task's head), `fused/<task>/normalized_acc` (merged /
own fine-tune); their means over the tasks under `members/mean/` and `fused/mean/`; the merge's cost
(`fused/merge_s`, `fused/merge_peak_mb`); `objective/val_acc`, the merged model's mean val accuracy
(val only). With `compress`, each task's fine-tune is compressed (`compressed/<task>`), each task's
merged model too (`compressed_fused/<task>`: merge, then compress), and the compressed fine-tunes are
merged (`fused_compressed/<task>`: compress, then merge; see compress_tasks).

No task trains on another task's held-out rows: tasks read from one corpus (two labellings of the
debates, say) share inputs, and a merged model evaluated on task A would otherwise hold weights
fitted on A's test inputs by task B. Every training row that is another task's val or test input
is dropped from that task's training split before anything trains (counted in
`data/<task>/dropped_shared_rows`; the member cache key covers which rows were dropped).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from runner.batches import take
from runner.cache import MemberCache, code_digest, digest
from runner.compress import CompressContext, Recipe, build_recipe, compression_report
from runner.compress.weight_only import dequantized
from runner.config import build, validate
from runner.data import DataSpec, as_source
from runner.data.base import row_keys
from runner.data.sources import data_spec, with_data_values
from runner.device import data_on_device, job_device, on_device
from runner.errors import ConfigError, check
from runner.evaluate import predict_proba
from runner.fuse.base import collect
from runner.fuse.multitask import PoolMerge, TaskModel, backbone_keys
from runner.job import finished, job_run, job_timing, log_job, report, start_job
from runner.measure import PeakMemory
from runner.members import Member, train_member
from runner.models import facts
from runner.models.adapter import (
    build_model,
    check_forward,
    load_checkpoint,
    read_state_dict,
    state_dict_problems,
)
from runner.recorder import Recorder
from runner.tracking import EpochMetricsLogger, Tracker
from runner.train import check_devices

log = logging.getLogger(__name__)
TASK_KEYS = ("data", "checkpoint")


@dataclass
class Task:
    name: str
    cfg: DictConfig  # the job's config with this task's data (and what the data holds) as `data`
    datamodule: Any
    spec: DataSpec
    member: Member
    checkpoint: str | None = None  # a fine-tuned model loaded instead of training the member
    dropped: int = 0  # training rows dropped because they are another task's val or test inputs
    initial: dict[str, Tensor] = field(default_factory=dict)  # the member's weights before it trained
    probe_head: bool = False  # a backbone-only checkpoint: the head is fitted on its frozen features
    recipe: Recipe | None = None  # the compression recipe built for this task's data
    metrics: dict[str, float] = field(default_factory=dict)  # the member's test metrics


@dataclass
class PoolPlan:
    cfg: DictConfig  # the job's config, `data` removed (each task has its own)
    tasks: list[Task]
    method: PoolMerge | None
    recipe: Recipe
    cache: MemberCache
    start: dict[str, Tensor]  # theta_0: the shared start, read before any member trains
    code: dict[str, str]
    job_tags: dict[str, str]


def is_pool(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "tasks"))


def run_pool(
    cfg: DictConfig,
    overrides: list[str] | tuple[str, ...] = (),
    parent_id: str | None = None,
    tags: dict[str, str] | None = None,
    tracker: Tracker | None = None,
    choices: dict[str, str] | None = None,
) -> dict[str, float]:
    """Fine-tune (or load) one member per task, merge, evaluate every task, log; as runner.pipeline.run."""
    started = start_job()
    job = plan_pool(cfg)  # every bad value fails here, before any training
    tracker = tracker or build(job.cfg.tracking, "tracking")
    busy_before, setup_before = tracker.busy_s, tracker.setup_s
    if (done := finished(job.cfg.cache.skip_finished, job.job_tags, tracker)) is not None:
        return done
    picked = {k: v for k, v in (choices or {}).items() if k != "choice/data"}  # each task has its own data
    with job_run(tracker, as_container(job.cfg), job.code, job.job_tags, overrides, parent_id, tags, picked) as (
        run_id,
        params,
        run_tags,
    ):
        device = job_device(job.cfg.trainer)
        recorders = {}
        for task in job.tasks:
            data_on_device(task.datamodule, device, job.cfg.trainer)
            recorders[task.name] = Recorder(
                tracker, run_id, task.datamodule, job.cfg.eval, params, {**run_tags, "task": task.name}, device
            )
        train_tasks(job, recorders)
        merged = merge_tasks(job, recorders)
        compress_tasks(job, recorders, merged)
        timing = job_timing(tracker, started, busy_before, setup_before)
        first = recorders[job.tasks[0].name]
        table = {k: v for r in recorders.values() for k, v in r.table.items()}
        summary = log_job(first, merged.metrics, timing, table)
    report(summary)
    return {k: v for r in recorders.values() for k, v in r.results.items()} | merged.metrics


def plan_pool(cfg: DictConfig) -> PoolPlan:
    """Build and check every task (data, a member with its own head, one shared start), the merge
    method, the recipe and the cache; the hash of the config and code. No training."""
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check(
        cfg.get("fuse") is None,
        "fuse",
        OmegaConf.select(cfg, "fuse._target_"),
        "null in a pool of tasks: merge=<method> (conf/merge/) merges the tasks' models; fuse combines "
        "members of one task",
    )
    check(
        cfg.get("ensemble") is None,
        "ensemble",
        "set",
        "null in a pool of tasks (one member per task, seeded by `seed`)",
    )
    entries = cfg.tasks
    check(
        OmegaConf.is_dict(entries) and len(entries) >= 1,
        "tasks",
        entries,
        "a mapping of task name -> {data: <a data config>, checkpoint: null or a file}",
    )
    tasks = [plan_task(cfg, str(name), node) for name, node in entries.items()]
    method = build(cfg.merge, "merge") if cfg.get("merge") else None
    check(
        method is None or len(tasks) >= 2,
        "tasks",
        [t.name for t in tasks],
        f"2 or more tasks to merge with {type(method).__name__}",
    )
    start = shared_start(tasks)
    drop_shared_rows(tasks)
    for task in tasks:  # per task: a student's config reads the task's data (`${data.num_classes}`)
        task.recipe = build_recipe(task.cfg.compress)
        task.recipe.check(task.member.net, task.spec, ensemble=False, members=1)
    recipe = tasks[0].recipe
    check_devices(cfg.trainer)
    cache = MemberCache(cfg.cache.dir)
    cache.check_writable()
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "data"])
    code = code_digest(
        [
            *(t.member.net for t in tasks),
            *(t.datamodule for t in tasks),
            *(getattr(t.datamodule, "inner", None) for t in tasks),
            *recipe.steps,
            method,
        ]
    )
    config = {k: v for k, v in as_container(job_cfg).items() if k not in ("tracking", "cache")}
    job_hash = digest({"config": config, "code": code})
    return PoolPlan(job_cfg, tasks, method, recipe, cache, start, code, {"role": "job", "job_hash": job_hash})


def as_container(cfg: DictConfig) -> dict[str, Any]:
    """The pool's config as plain values, `model` and `compress` as written: what they read from the
    data (`${data.num_classes}`, a student's too) differs by task, so it is left unresolved."""
    return {
        k: OmegaConf.to_container(v, resolve=k not in ("model", "compress")) if OmegaConf.is_config(v) else v
        for k, v in ((k, cfg[k]) for k in cfg)
    }


def plan_task(cfg: DictConfig, name: str, node: Any) -> Task:
    """One task: its data loaded, its member built (the job's model with this task's classes)."""
    key = f"tasks.{name}"
    check(
        OmegaConf.is_dict(node) and OmegaConf.select(node, "data._target_") is not None,
        key,
        OmegaConf.to_container(node) if OmegaConf.is_config(node) else node,
        "a task with a data config (`data:` with a _target_, e.g. from `- /data@tasks.<name>.data: debates` in "
        "the experiment's defaults); check the task name against the pool's",
    )
    unknown = sorted(set(node) - set(TASK_KEYS))
    check(not unknown, f"{key}.{unknown[0]}" if unknown else key, unknown, f"the keys {list(TASK_KEYS)}")
    task_cfg = copy.deepcopy(cfg)
    with open_dict(task_cfg):
        task_cfg.data = node.data
    datamodule = as_source(build(task_cfg.data, f"{key}.data"))
    datamodule.record_row_keys = True  # in-memory sources key their raw rows (drop_shared_rows)
    spec = data_spec(datamodule)
    task_cfg = with_data_values(task_cfg, datamodule)
    pl.seed_everything(cfg.seed, verbose=False)
    net = build_model(task_cfg.model, "model")
    check_forward(net, spec.example, spec.num_classes, key, spec.input_spec)
    return Task(name, task_cfg, datamodule, spec, Member(name, cfg.seed, net, key), node.get("checkpoint"))


def shared_start(tasks: list[Task]) -> dict[str, Tensor]:
    """Give every task's member the first task's backbone (one start, theta_0; the heads stay each
    task's own), then load any task's fine-tuned checkpoint; returns a copy of theta_0."""
    first = tasks[0].member.net
    keys = backbone_keys(first)
    theta0 = {k: v.detach().clone() for k, v in first.state_dict().items()}
    for task in tasks[1:]:
        state = task.member.net.state_dict()
        theirs = {k: tuple(state[k].shape) for k in backbone_keys(task.member.net)}
        ours = {k: tuple(theta0[k].shape) for k in keys}
        if theirs != ours:
            differ = sorted(set(theirs.items()) ^ set(ours.items()))[:4]
            raise ConfigError(
                "tasks (backbone)",
                f"{tasks[0].name} and {task.name} differ: {differ}",
                "tasks whose models are one architecture from one start (the same model config; only the heads "
                "differ, by each task's classes)",
            )
        task.member.net.load_state_dict({**state, **{k: theta0[k] for k in keys}})
    for task in tasks:
        task.initial = {k: v.detach().clone() for k, v in task.member.net.state_dict().items()}
        if task.checkpoint:
            load_task_checkpoint(task)
        facts.set_init_id(task.member.net, facts.state_hash(task.member.net))
    return theta0


def load_task_checkpoint(task: Task) -> None:
    """`tasks.<name>.checkpoint`: the task's fine-tuned model, used as it is; or its fine-tuned backbone
    alone (no head entries: a checkpoint of the encoder only), whose new head is then fitted on its
    frozen features (a linear probe, with the job's optim and trainer)."""
    key, net = f"tasks.{task.name}.checkpoint", task.member.net
    state = read_state_dict(task.checkpoint, key)
    own = net.state_dict()
    head = set(own) - set(backbone_keys(net))
    if head & set(state):
        load_checkpoint(net, task.checkpoint, key, state)
        return
    problems = state_dict_problems(own, state, may_miss=head)
    check(
        not problems,
        key,
        task.checkpoint,
        f"weights for {type(net).__name__} (the whole model, or its backbone without {sorted(head)}); "
        + "; ".join(problems),
    )
    net.load_state_dict({**own, **state})
    task.probe_head = True
    task.member.optim = {"finetune": "linear_probe"}  # over the job's optim; in the member's cache key


def split_keys(datamodule: Any, split: str) -> list[bytes]:
    """One key per row of a split: of the raw rows where the source recorded them (runner.data.base:
    equal rows match whatever each task's preprocessing), else of the inputs as the models see them."""
    recorded = getattr(datamodule, "row_keys", None)
    if recorded and split in recorded:
        return recorded[split]
    splits = getattr(datamodule, "splits", None)
    x = splits[split][0] if splits and split in splits else collect(getattr(datamodule, f"{split}_dataloader")())[0]
    if isinstance(x, Mapping):
        x = x["input_ids"] if "input_ids" in x else next(iter(x.values()))
    return row_keys(x.detach().cpu().numpy())


def drop_shared_rows(tasks: list[Task]) -> None:
    """Drop from each task's training split the rows that are another task's val or test rows (see
    the module's docstring); a source without in-memory splits that has such rows is refused."""
    held_out = {t.name: set(split_keys(t.datamodule, "val")) | set(split_keys(t.datamodule, "test")) for t in tasks}
    for task in tasks:
        others = set().union(*(h for name, h in held_out.items() if name != task.name))
        keys = split_keys(task.datamodule, "train")
        shared = [i for i, k in enumerate(keys) if k in others]
        if not shared:
            continue
        splits = getattr(task.datamodule, "splits", None)
        check(
            bool(splits) and "train" in splits,
            f"tasks.{task.name}.data",
            f"{len(shared)} training rows are other tasks' val or test rows",
            "tasks whose training rows are no other task's held-out rows (sources holding their splits in "
            "memory have such rows dropped)",
        )
        keep = torch.tensor(sorted(set(range(len(keys))) - set(shared)))
        x, y = splits["train"]
        splits["train"] = (take(x, keep), y[keep])
        if task.datamodule.row_keys:
            task.datamodule.row_keys["train"] = [keys[i] for i in keep.tolist()]
        task.dropped = len(shared)
        # the member cache key covers which rows were dropped (runner.members._member_key merges member.data)
        dropped_id = hashlib.sha256(b"".join(sorted(keys[i] for i in shared))).hexdigest()[:16]
        task.member.data = {"dropped_shared_rows": f"{len(shared)}:{dropped_id}"}
        log.info("task %s: %d training rows are other tasks' held-out rows, dropped", task.name, len(shared))


def train_tasks(job: PoolPlan, recorders: dict[str, Recorder]) -> None:
    """Each task's member fine-tuned on its train split (or loaded from the cache or its checkpoint),
    evaluated on its task's test split in its own run."""
    cfg = job.cfg
    for task in job.tasks:
        recorder, member = recorders[task.name], task.member
        tracker = recorder.tracker
        with tracker.run(*recorder.child("member", member.name), parent_id=recorder.run_id, wait=False) as run:
            start = time.perf_counter()
            if task.checkpoint and not task.probe_head:
                hit, times = None, {}
                tags = {"source": "checkpoint"}
            else:
                hit = train_member(
                    member,
                    task.datamodule,
                    cfg.trainer,
                    cfg.optim,
                    task.cfg.data,
                    job.cache,
                    EpochMetricsLogger(tracker, run),
                )
                times = {"train_s": member.train_s, **({"cache_load_s": time.perf_counter() - start} if hit else {})}
                tags = {
                    "cache": "hit" if hit else "miss",
                    **({"source": "checkpoint backbone"} if task.probe_head else {}),
                }
            member.metrics, member.probs = recorder.evaluate(
                "member", member.name, member.net, tags=tags, derive=lambda _, t=times: dict(t), run_id=run
            )
            task.metrics = member.metrics


@dataclass
class Merged:
    metrics: dict[str, float]  # the job run's (see merge_tasks)
    nets: dict[str, Any]  # task -> the model evaluated for it: the merged one, else its member
    fused: dict[str, dict[str, float]]  # task -> the merged model's test metrics


def merge_tasks(job: PoolPlan, recorders: dict[str, Recorder]) -> Merged:
    """Every task's member and (with a method) merged model, their means over the tasks, the merge's
    cost, and the objective: the mean val accuracy of the merged models (else of the members)."""
    out: dict[str, float] = {}
    for task in job.tasks:
        out.update({f"member/{task.name}/{k}": v for k, v in task.metrics.items() if k.startswith("test/")})
        out[f"data/{task.name}/dropped_shared_rows"] = float(task.dropped)
    out.update(_means("members/mean", [t.metrics for t in job.tasks]))
    nets, fused = {t.name: t.member.net for t in job.tasks}, {}
    if job.method is not None:
        models = []
        for task in job.tasks:
            x, y = collect(task.datamodule.val_dataloader())
            models.append(TaskModel(task.name, task.member.net, x, y))
        device = recorders[job.tasks[0].name].device
        with on_device([m.net for m in models], device), PeakMemory() as peak:
            started = time.perf_counter()
            if job.method.trains:  # multi-task training: from each task's start, on the training splits
                pl.seed_everything(job.cfg.seed, verbose=False)
                job.method.fit_training(
                    [TaskModel(t.name, initial_net(t)) for t in job.tasks],
                    {t.name: t.datamodule.train_dataloader() for t in job.tasks},
                    job.cfg.trainer,
                    job.cfg.optim,
                )
            else:
                job.method.fit(job.start, models)
            merge_s = time.perf_counter() - started
        for task, model in zip(job.tasks, models):
            nets[task.name] = job.method.task_net(model)
            own = task.metrics.get("test/acc")
            fused[task.name], _ = recorders[task.name].evaluate(
                "fused",
                task.name,
                nets[task.name],
                derive=lambda m, own=own: {"normalized_acc": m["test/acc"] / own} if own else {},
            )
            out.update(
                {f"fused/{task.name}/{k}": v for k, v in fused[task.name].items() if "/" in k or k == "normalized_acc"}
            )
        out.update(_means("fused/mean", list(fused.values())))
        out.update({"fused/merge_s": merge_s, "fused/merge_peak_mb": peak.mb})
        out.update({f"fused/{k.removeprefix('merge/')}": v for k, v in job.method.stats().items()})
    val = []
    for task in job.tasks:
        with on_device(nets[task.name], recorders[task.name].device):
            probs, y = predict_proba(nets[task.name], task.datamodule.val_dataloader())
        val.append(float((probs.argmax(1) == y).float().mean()))
    out["objective/val_acc"] = sum(val) / len(val)  # never a test number
    return Merged(out, nets, fused)


def initial_net(task: Task) -> Any:
    """A copy of the task's member as it was before it trained (theta_0 and the task's new head)."""
    net = facts.copy_facts(task.member.net, copy.deepcopy(task.member.net))
    net.load_state_dict(task.initial)
    return net


def compress_tasks(job: PoolPlan, recorders: dict[str, Recorder], merged: Merged) -> None:
    """With a recipe, three orders, each against its uncompressed counterpart:
    `compressed/<task>`: each task's member compressed;
    `compressed_fused/<task>`: merge, then compress (each task's merged model);
    `fused_compressed/<task>`: compress, then merge (the compressed members' weights, int8 ones
    dequantized, merged as floats; as the single-task pipeline's fused_compressed fuses compressed members).
    Their test metrics and changes go into `merged.metrics`, with means over the tasks."""
    if not job.recipe:
        return
    cfg, out = job.cfg, merged.metrics
    small: dict[str, Any] = {}
    for role in ("compressed", "compressed_fused"):
        if role == "compressed_fused" and job.method is None:
            continue
        rows = []
        for task in job.tasks:
            net, base = (
                (merged.nets[task.name], merged.fused[task.name])
                if role == "compressed_fused"
                else (task.member.net, task.metrics)
            )
            context = CompressContext(task.datamodule, cfg.trainer, cfg.optim, teacher=net)
            model = task.recipe.apply(net, context)
            if role == "compressed":
                small[task.name] = model
            metrics, _ = recorders[task.name].evaluate(
                role, task.name, model, derive=lambda m, b=base, r=task.recipe: {**compression_report(b, m), **r.stats_}
            )
            rows.append(metrics)
            out.update({f"{role}/{task.name}/{k}": v for k, v in metrics.items() if "/" in k or k.endswith("_ratio")})
        out.update(_means(f"{role}/mean", rows))
    if job.method is None or job.method.trains:
        return
    if not job.recipe.keeps_weights:  # a student is a new network, not a fine-tune of the start
        log.info("compress, then merge: not done, %s replaces the members by new networks", job.recipe)
        out["fused_compressed/skipped"] = 1.0
        return
    floats = {t.name: float_weights(small[t.name], t.member.net) for t in job.tasks}
    missing = {name: why for name, why in floats.items() if isinstance(why, str)}
    if missing:  # e.g. structured pruning changed the shapes, or a static int8 graph holds no per-layer weights
        log.warning("compress, then merge: not done, the compressed members' weights do not map: %s", missing)
        out["fused_compressed/skipped"] = 1.0
        return
    models = []
    for task in job.tasks:
        net = facts.copy_facts(task.member.net, copy.deepcopy(task.member.net))
        net.load_state_dict(floats[task.name])
        x, y = collect(task.datamodule.val_dataloader())
        models.append(TaskModel(task.name, net, x, y))
    method = build(cfg.merge, "merge").fit(job.start, models)
    rows = []
    for task, model in zip(job.tasks, models):
        metrics, _ = recorders[task.name].evaluate(
            "fused_compressed",
            task.name,
            method.task_net(model),
            derive=lambda m, b=merged.fused[task.name]: compression_report(b, m),
        )
        rows.append(metrics)
        out.update({f"fused_compressed/{task.name}/{k}": v for k, v in metrics.items() if "/" in k})
    out.update(_means("fused_compressed/mean", rows))


def float_weights(model: Any, like: Any) -> dict[str, Tensor] | str:
    """`model`'s (a compressed copy of `like`) weights as floats under `like`'s state-dict names: torch.ao
    int8 modules' weight() and bias() dequantized, torchao's weight-only int8 and int4 ones too
    (runner.compress.weight_only.dequantized), pruned ones as they are.
    A reason (str) where some of `like`'s entries have no counterpart of the same shape."""
    found: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, torch.nn.Module):  # torch.ao quantized Linear
            found[f"{name}.weight"] = weight().dequantize()
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            if bias is not None:
                found[f"{name}.bias"] = bias
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor) and key not in found:  # torchao's int8/int4 weights: what the layer multiplies by
            found[key] = value.dequantize() if value.is_quantized else dequantized(value)
    wanted = like.state_dict()
    wrong = [k for k, v in wanted.items() if k not in found or found[k].shape != v.shape]
    if wrong:
        return f"{len(wrong)} of {len(wanted)} entries, e.g. {wrong[:3]}"
    return {k: found[k].to(v.dtype) for k, v in wanted.items()}


def _means(prefix: str, rows: list[dict[str, float]]) -> dict[str, float]:
    """Means over the tasks of the metrics every row has (test metrics and normalized accuracy)."""
    keys = set.intersection(*(set(r) for r in rows)) if rows else set()
    keys = {k for k in keys if k.startswith(("test/", "delta/")) or k.endswith(("normalized_acc", "_ratio"))}
    return {f"{prefix}/{k}": sum(r[k] for r in rows) / len(rows) for k in sorted(keys)}

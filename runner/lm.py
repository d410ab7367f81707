"""A causal language model as a job: the model as loaded, evaluated on held-out text, and the same
model compressed by a recipe, evaluated the same way, side by side.

    python -m runner experiment=smollm2_lm compress=quant_int8_weight

A job of this kind is chosen by the model: `_target_: runner.models.CausalLM` (conf/model/smollm2_lm.yaml).
The texts are those of any text data option (`data=rotten_tomatoes`, `data=debates`, `data=text` for a
file of one's own), tokenized by the model's own tokenizer; their labels are not read. The test split is
what is reported, the training split is what calibration (Wanda) and distillation read, and nothing
else is read.

Per model, in the job run (`lm/member/`, `lm/compressed/`) and in a child run of each (role `member`
and `compressed`, as the pipeline's; the test figures there under `test/`): perplexity and next-token accuracy over every real token of
the test texts after their first (runner.models.lm_metrics), the tokens so predicted per second over
that pass (`tokens_per_s`: batches of `data.eval_batch_size` texts, the job's `threads`), the latency of
one batch (`eval.latency_*`: median and quartiles), weight bytes, parameters and the peak resident
memory of the evaluation above what the process held before it (`eval_peak_mb`). For the compressed
model also what the compression took (`compress_s`, `compress_peak_mb`), the changes against the base
(`delta/perplexity`, `delta/next_token_acc`, `perplexity_ratio`) and compression_report's weight_ratio
and speedup with its interval, besides the steps' own figures (e.g. `wanda/sparsity`).

The model is not fine-tuned here (`trainer` serves the steps that train, distill_lm), there are no ensembles, fusion or
pools of LMs in this job (fine-tunes of an LLM as a classifier go through the usual pipeline:
model=smollm2), and the models are not logged as MLflow models (a float32 SmolLM2 is 540 MB; its source
is the installed package named by `model.weights`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from runner.batches import split_batch
from runner.cache import code_digest, digest
from runner.compress import CompressContext, Recipe, build_recipe, compression_report
from runner.config import build, validate
from runner.data import DataSpec, as_source
from runner.data.sources import data_spec
from runner.errors import check
from runner.evaluate.summary import format_table
from runner.job import SUMMARY, JobSummary, finished, job_run, job_timing, report, start_job
from runner.measure import PeakMemory, latency_stats, weight_bytes
from runner.models.llm import lm_metrics
from runner.recorder import Recorder
from runner.tracking import Tracker

log = logging.getLogger(__name__)
LM_TARGETS = ("runner.models.CausalLM", "runner.models.llm.CausalLM")
TEST = {k: f"test/{k}" for k in ("perplexity", "nll", "next_token_acc", "tokens")}  # what the test split gave


@dataclass
class LMPlan:
    cfg: DictConfig
    datamodule: Any
    spec: DataSpec
    model: nn.Module
    recipe: Recipe
    code: dict[str, str]
    job_tags: dict[str, str]


def is_lm(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "model._target_") in LM_TARGETS


def run_lm(
    cfg: DictConfig,
    overrides: list[str] | tuple[str, ...] = (),
    parent_id: str | None = None,
    tags: dict[str, str] | None = None,
    tracker: Tracker | None = None,
    choices: dict[str, str] | None = None,
) -> dict[str, float]:
    """Evaluate the causal LM, compress it, evaluate the compressed copy, log; as runner.pipeline.run."""
    started = start_job()
    job = plan_lm(cfg)  # every bad value fails here, before any model is compressed
    tracker = tracker or build(job.cfg.tracking, "tracking")
    busy_before, setup_before = tracker.busy_s, tracker.setup_s
    if (done := finished(job.cfg.cache.skip_finished, job.job_tags, tracker)) is not None:
        return done
    resolved = OmegaConf.to_container(job.cfg, resolve=True)
    name = (choices or {}).get("choice/model") or type(job.model).__name__.lower()
    with job_run(tracker, resolved, job.code, job.job_tags, overrides, parent_id, tags, choices) as (
        run_id,
        params,
        run_tags,
    ):
        test = list(text_inputs(job.datamodule.test_dataloader()))
        rows = {"member": measure_lm(job.model, test, job.cfg.eval)}
        if job.recipe:
            log.info("compressing %s with %s", name, job.recipe)
            context = CompressContext(job.datamodule, job.cfg.trainer, job.cfg.optim, teacher=job.model)
            torch.manual_seed(job.cfg.seed)  # the calibration batches drawn, a student's initial weights
            with PeakMemory() as peak:
                start = time.perf_counter()
                small = job.recipe.apply(job.model, context)
                seconds = time.perf_counter() - start
            rows["compressed"] = measure_lm(small, test, job.cfg.eval)
            rows["compressed"].update(
                {
                    "compress_s": seconds,
                    "compress_peak_mb": peak.mb,
                    **lm_deltas(rows["member"], rows["compressed"]),
                    **job.recipe.stats_,
                }
            )
        recorder = Recorder(tracker, run_id, job.datamodule, job.cfg.eval, params, run_tags)
        for role, row in rows.items():  # one child run per model, as the pipeline's (reports read them)
            tracker.log_child(run_id, *recorder.child(role, name), {TEST.get(k, k): v for k, v in row.items()})
        metrics = {f"lm/{role}/{k}": float(v) for role, row in rows.items() for k, v in row.items()}
        timing = job_timing(tracker, started, busy_before, setup_before)
        tracker.log_metrics(run_id, {**metrics, **timing})
        table = format_table(rows)
        tracker.log_text(run_id, table + "\n", SUMMARY)
    report(JobSummary(timing, table))
    return metrics


def plan_lm(cfg: DictConfig) -> LMPlan:
    """Build and check the data, the model and the recipe, and hash the config and code; nothing is
    compressed yet. Keys this job does not use are refused, naming them."""
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for key in ("ensemble", "fuse", "merge", "tasks"):
        value = OmegaConf.select(cfg, key)
        check(
            value is None,
            key,
            OmegaConf.select(cfg, f"{key}._target_") or "set",
            f"null with a causal LM (model._target_ {cfg.model._target_}): this job evaluates and compresses one "
            "language model; ensembles, fusion and pools take LMs as classifiers (model=smollm2)",
        )
    datamodule = as_source(build(cfg.data, "data"))
    spec = data_spec(datamodule)
    check(
        isinstance(spec.example, Mapping) and "input_ids" in spec.example,
        "data",
        OmegaConf.select(cfg, "data._target_"),
        "a text data option (token ids: data=rotten_tomatoes, data=debates, data=text)",
    )
    model = build(cfg.model, "model")
    recipe = build_recipe(cfg.compress)
    recipe.check(model, spec, ensemble=False, members=1)
    code = code_digest([model, datamodule, getattr(datamodule, "inner", None), *recipe.steps])
    config = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("tracking", "cache")])
    job_hash = digest({"config": OmegaConf.to_container(config, resolve=True), "code": code})
    return LMPlan(cfg, datamodule, spec, model, recipe, code, {"role": "job", "job_hash": job_hash})


def text_inputs(batches: Any) -> Iterator[dict[str, Tensor]]:
    """The {input_ids, attention_mask} of each (x, y) batch of a text data source, on the CPU."""
    for batch in batches:
        x = split_batch(batch)[0]
        yield {k: v.cpu() for k, v in x.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def measure_lm(model: nn.Module, batches: list[dict[str, Tensor]], eval_cfg: Mapping[str, Any]) -> dict[str, float]:
    """lm_metrics over `batches`, timed (tokens_per_s: predicted tokens per second of that pass) and
    under PeakMemory; the latency of the first batch (eval.latency_* settings); weight bytes, params."""
    with PeakMemory() as peak:
        start = time.perf_counter()
        metrics = lm_metrics(model, batches)
        seconds = time.perf_counter() - start
    latency = latency_stats(
        model,
        batches[0],
        repeats=eval_cfg.get("latency_repeats", 30),
        warmup_s=eval_cfg.get("latency_warmup_s", 0.2),
        min_time_s=eval_cfg.get("latency_min_time_s", 0.5),
        max_repeats=eval_cfg.get("latency_max_repeats", 10_000),
        threads=eval_cfg.get("latency_threads"),
    )
    size = weight_bytes(model)
    return {
        **metrics,
        "eval_s": seconds,
        "tokens_per_s": metrics["tokens"] / seconds,
        "eval_peak_mb": peak.mb,
        **latency.metrics(),
        "latency_batch_texts": float(len(batches[0]["input_ids"])),
        "weight_bytes": float(size),
        "weight_mb": size / 1e6,
        "params": float(sum(p.numel() for p in model.parameters())),
    }


def lm_deltas(base: Mapping[str, float], compressed: Mapping[str, float]) -> dict[str, float]:
    """The compressed model against the base: perplexity and next-token accuracy changes, and
    compression_report's weight_ratio and speedup (from the latency quartiles)."""
    return {
        "delta/perplexity": compressed["perplexity"] - base["perplexity"],
        "perplexity_ratio": compressed["perplexity"] / base["perplexity"],
        "delta/next_token_acc": compressed["next_token_acc"] - base["next_token_acc"],
        "tokens_per_s_ratio": compressed["tokens_per_s"] / base["tokens_per_s"],
        **compression_report(base, compressed),
    }

"""Evaluate each model once on the test split, log it as a nested MLflow run, keep the summary rows.

A pipeline stage: it joins evaluation (runner.evaluate), export (runner.export) and tracking
(runner.tracking), which know nothing of each other.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from runner.batches import first_inputs, to_device
from runner.compress.quantize import shippable
from runner.device import CPU, on_device, placement
from runner.evaluate import evaluate_model
from runner.evaluate.plots import confusion_matrix_figure
from runner.export import check_export, export_model
from runner.measure import latency_stats
from runner.models.facts import cache_entry
from runner.tracking.models import (
    CACHE_ENTRY_TAG,
    logged_model_name,
    pack_model,
)  # (no mlflow: imported where a model is logged)

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("nll", "ece", "loss")  # for members/best/test/<metric>
SOURCE = "mlflow.source."  # MLflow's source tags: mlflow.source.name, mlflow.source.git.commit


def class_names(datamodule: Any) -> list[str]:
    """The names of the classes in label order (a data source's `classes`), or [] where it has none."""
    names = [str(c) for c in (getattr(datamodule, "classes", None) or [])]
    return names if len(names) == getattr(datamodule, "num_classes", None) else []


class Recorder:
    def __init__(
        self,
        tracker: Any,
        run_id: str,
        datamodule: Any,
        eval_cfg: Any,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        device: torch.device = CPU,
    ) -> None:
        self.tracker, self.run_id, self.datamodule, self.cfg = tracker, run_id, datamodule, eval_cfg
        self.device = device  # the job's (runner/device.py): models are evaluated and timed there
        self.params = params
        # the job's own tags (overrides, sweep_id, job_hash) go on every child so filters see them, and
        # its source (the command, the git commit) on every child and logged model
        self.tags = {k: v for k, v in (tags or {}).items() if not k.startswith("mlflow.") or k.startswith(SOURCE)}
        self.results: dict[str, float] = {}  # flat, namespaced: member/cnn1d-s0/test/acc
        self.table: dict[str, dict[str, float]] = {}
        self.targets: torch.Tensor | None = None  # test labels, read on the first evaluation
        self.latency_x = None  # one fixed batch of test inputs, the same for every model
        self.by_role: dict[str, dict[str, dict[str, float]]] = {}  # role -> member name (or role) -> metrics
        self.classes = class_names(datamodule)  # the labels' names, where the data source knows them

    def evaluate(
        self,
        role: str,
        name: str,
        model: nn.Module,
        derive: Callable[[dict[str, float]], Mapping[str, float]] | None = None,
        tags: Mapping[str, str] | None = None,
        probs: torch.Tensor | None = None,
        run_id: str | None = None,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics of `model` on test (one forward pass), logged under `<role>/<name>`: into `run_id`
        (a member's run, opened with `child()` before it trained) or a new child run of the job.

        `derive(metrics)` adds metrics computed from these, e.g. the compression ratio against the
        uncompressed member or the gain of the fused model over the best member.
        """
        loader = self.datamodule.test_dataloader()
        if self.latency_x is None:  # on the CPU (logging and export read it), moved for timing
            self.latency_x = first_inputs(loader, self.cfg.latency_batch_size)
        where, why = placement(model, self.device)
        with on_device(model, where):
            metrics, probs, confusion, self.targets = evaluate_model(
                model,
                loader,
                self.datamodule.num_classes,
                self.cfg.metrics,
                self.cfg.ece_bins,
                to_device(self.latency_x, where),
                self.cfg.latency_repeats,
                probs,
                self.targets,
                latency_warmup_s=self.cfg.latency_warmup_s,
                latency_min_time_s=self.cfg.latency_min_time_s,
                latency_max_repeats=self.cfg.latency_max_repeats,
                latency_threads=self.cfg.latency_threads,
            )
        # a member's cached weights (runner.members.cache_entry), on its run and its logged model: a later
        # job's cache hit of the same member finds that model rather than logging it again
        entry = cache_entry(model) if role == "member" else None
        # where it ran (its latency is that device's), and why not on the job's device
        tags = {
            **(tags or {}),
            "device": where.type,
            **({"device_note": why} if why else {}),
            **({CACHE_ENTRY_TAG: entry} if entry else {}),
        }
        metrics = {f"test/{k}" if k in self.cfg.metrics else k: v for k, v in metrics.items()}
        metrics.update(derive(metrics) if derive else {})
        prefix = f"{role}/{name}" if name else role
        self.results.update({f"{prefix}/{k}": v for k, v in metrics.items()})
        self.table[prefix] = {k.removeprefix("test/"): v for k, v in metrics.items()}
        log_model = getattr(self.tracker, "log_models", False)
        shipped = {"model": self._pack(model, prefix, role, name, entry)} if log_model else {}
        export_tags, files = (
            self._export(model, prefix, loader, probs, metrics, where) if self.cfg.export != "none" else ({}, {})
        )
        self.by_role.setdefault(role, {})[name or role] = metrics
        arrays = {"probs": probs.numpy(), "targets": self.targets.numpy()}
        if run_id is None:
            name_, params, child_tags = self.child(role, name, {**(tags or {}), **export_tags})
            self.tracker.log_child(self.run_id, name_, params, child_tags, metrics, arrays, files=files, **shipped)
        else:
            self.tracker.log_evaluation(
                run_id, {**(tags or {}), **export_tags}, metrics, arrays, files=files, **shipped
            )
        self.tracker.log_figure(
            self.run_id, confusion_matrix_figure(confusion, prefix, self.classes), f"confusion/{prefix}.png"
        )
        return metrics, probs

    def child(self, role: str, name: str, tags: Mapping[str, str] | None = None) -> tuple[str, dict, dict]:
        """(run name, params, tags) of the child run of one evaluated model: the job's params and tags
        (so filters see them) plus `role`, `member` and `model_name` (the member's name less its seed:
        minilm-s3 -> minilm, what a report groups members of one model by)."""
        base = re.sub(r"-s\d+$", "", name) if name else role
        return (
            f"{role}/{name}" if name else role,
            {**self.params, "role": role, "member": name or role},
            {**self.tags, "role": role, "member": name or role, "model_name": base, **(tags or {})},
        )

    def job_metrics(self) -> dict[str, float]:
        """The job run's metrics, named the same in every job whatever its members are called:
        `members/mean/<metric>`, `members/std/<metric>` and `members/best/<metric>` over the members
        (best: the highest, or the lowest for nll, ece and losses; test/* metrics only), the same under
        `compressed/`, and `fused/<metric>`, `fused_compressed/<metric>` as they are. Per-member
        metrics stay in the members' own runs."""
        out: dict[str, float] = {}
        for role, group in (("member", "members"), ("compressed", "compressed")):
            rows = list(self.by_role.get(role, {}).values())
            if not rows:
                continue
            out[f"{group}/n"] = float(len(rows))
            for key in sorted({k for r in rows for k in r}):
                values = torch.tensor([r[key] for r in rows if key in r], dtype=torch.float64)
                out[f"{group}/mean/{key}"] = float(values.mean())
                if len(values) > 1:
                    out[f"{group}/std/{key}"] = float(values.std())
                if key.startswith("test/"):
                    lower = key.split("/")[-1] in LOWER_IS_BETTER
                    out[f"{group}/best/{key}"] = float(values.min() if lower else values.max())
        for role in ("fused", "fused_compressed"):
            out.update({f"{role}/{k}": v for k, v in self.by_role.get(role, {}).get(role, {}).items()})
        return out

    def _export(
        self,
        model: nn.Module,
        prefix: str,
        loader: Any,
        probs: torch.Tensor,
        metrics: dict[str, float],
        where: torch.device = CPU,
    ) -> tuple[dict[str, str], dict[str, bytes]]:
        """eval.export=onnx: export the model (runner/export.py), run the export on test beside it and
        add its `export/*` metrics to `metrics`; the tags say the format and why not ONNX, the file
        becomes the child run's artifact export/model.onnx (or .pt2). ONNX Runtime runs on the CPU:
        a model evaluated on a GPU is timed on the CPU again for its speedup (`export/torch_cpu_latency_ms`)."""
        exported = export_model(model, self.latency_x)
        threads = self.cfg.latency_threads or torch.get_num_threads()
        timing = dict(
            repeats=self.cfg.latency_repeats,
            warmup_s=self.cfg.latency_warmup_s,
            min_time_s=self.cfg.latency_min_time_s,
            max_repeats=self.cfg.latency_max_repeats,
            threads=threads,
        )
        reference = metrics
        if where.type != "cpu":  # the model is back on the CPU here; compare CPU with CPU
            reference = latency_stats(model, self.latency_x, **timing).metrics()
            metrics["export/torch_cpu_latency_ms"] = reference["latency_ms"]
        metrics.update(check_export(model, exported, loader, probs, self.latency_x, reference, timing))
        self.results.update({f"{prefix}/{k}": v for k, v in metrics.items() if k.startswith("export/")})
        self.table[prefix].update({k: v for k, v in metrics.items() if k.startswith("export/")})
        tags = {"export": exported.format}
        if exported.reason:
            tags["export_error"] = exported.reason
            log.info("%s: exported as %s; %s", prefix, exported.format, exported.reason)
        return tags, ({f"export/model{exported.suffix}": exported.data} if exported.data else {})

    def model_meta(self, model: nn.Module) -> dict[str, Any]:
        """What a logged model needs beside its weights to answer raw inputs with class names: the class
        names, the model's own preprocessing (a pretrained tokenizer, an input size), and a tokenizer the
        data source trained (its JSON)."""
        meta: dict[str, Any] = {"classes": self.classes} if self.classes else {}
        meta.update(getattr(model, "preprocessing", None) or {})
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "backend_tokenizer") and "tokenizer" not in meta:
            meta["tokenizer_json"] = tokenizer.backend_tokenizer.to_str()
            meta["max_length"] = getattr(self.datamodule, "max_length", None)
        return meta

    def model_name(self, role: str, name: str) -> str:
        """The logged model's name: role and member (member-cnn1d-s0, compressed-cnn1d-s0), or role and
        fusion strategy (fused-mean: the fuse option picked, else the strategy's class)."""
        if not name and role.startswith("fused"):
            target = str(self.params.get("fuse._target_") or "")
            name = str(self.params.get("choice/fuse") or target.rpartition(".")[2].lower())
        return logged_model_name(role, name)

    def _pack(self, model: nn.Module, prefix: str, role: str, name: str, entry: str | None = None) -> Any:
        """The model as bytes for the tracker (tracking.log_models), named and tagged (the job's source, a
        member's cache `entry`) as its LoggedModel; None, with a warning, if it does not pickle (int8 FX
        graphs that would not unpickle go as TorchScript: runner.compress.quantize.shippable)."""
        try:
            raw = getattr(self.datamodule, "raw_inputs", None)
            tags = {k: v for k, v in self.tags.items() if k.startswith(SOURCE)}
            tags.update({CACHE_ENTRY_TAG: entry} if entry else {})
            return pack_model(
                shippable(model),
                self.latency_x,
                meta=self.model_meta(model),
                raw_inputs=raw() if raw else None,
                name=self.model_name(role, name),
                tags=tags,
            )
        except Exception as e:  # noqa: BLE001 (e.g. a torch.compile'd module): the results still get logged
            log.warning(
                "%s: the model cannot be pickled, so it is not logged to MLflow: %s: %s", prefix, type(e).__name__, e
            )
            return None

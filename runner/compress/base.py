"""Recipes: an ordered list of compression steps applied to a copy of a trained member."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from runner.batches import DataSpec
from runner.compress.requirements import check_requirements
from runner.config import build
from runner.device import INT8_CPU_ONLY
from runner.errors import ConfigError, check
from runner.measure import weight_bytes  # noqa: F401  (re-exported)
from runner.models import LitClassifier
from runner.models.facts import copy_facts
from runner.progress import MemberProgress
from runner.train import fit


@dataclass
class CompressContext:
    """What a step may need besides the model: data, the job's trainer/optim config, teachers."""

    datamodule: Any  # a data source (runner.data.base): train/val/test loaders
    trainer: Mapping[str, Any]
    optim: Mapping[str, Any]
    teacher: nn.Module | None = None  # the uncompressed trained member
    ensemble: nn.Module | None = None  # the fused ensemble (forward returns log-probabilities)
    members: list[nn.Module] | None = None  # every trained member of the job (multi-teacher distillation)


class QuantizedPreview(nn.Module):
    """Stands for the int8 version of `inner` while recipes are checked (no calibration needed)."""

    int8 = True  # is_quantized: the steps after it see an int8 model
    cpu_only_reason = INT8_CPU_ONLY  # runner.device

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Step:
    """One compression step. `key` names it in errors (`compress.steps[i]`), set by the Recipe.

    What a step needs from the model it gets and what it makes are declared on its class:
    `requires` names runner.compress.requirements' checks (`check` enforces them, before any
    training), `produces_int8` says its output is an int8 model (only the CPU runs it; `preview`
    stands it in while a recipe is checked, so the steps after it see an int8 model),
    `needs_ensemble` that it distills a fused ensemble.

    After `apply`, a step may leave figures about what it did in `self.stats_` (a flat dict of
    floats, keys namespaced by the step, e.g. `prune/macs_before`): the recipe gathers them and
    the pipeline logs them with the compressed model's metrics.
    """

    key: str = "compress.step"
    requires: ClassVar[frozenset[str]] = frozenset()
    float_note: ClassVar[str] = ""  # the refusal of a quantized model ("prune before quantizing")
    produces_int8: ClassVar[bool] = False
    # the output holds the input's own weights (pruned, quantized, fine-tuned: the same start), so the
    # compressed fine-tunes of one pretrained model can still be merged; False for a new network (a student)
    keeps_weights: ClassVar[bool] = True
    needs_ensemble: bool = False

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        """Raise ConfigError if this step cannot handle `model` on this data; runs before any training.
        Checks what the class `requires`; subclasses add what depends on their settings."""
        check_requirements(self, model)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        raise NotImplementedError

    def preview(self, model: nn.Module) -> nn.Module:
        """What `apply` would turn `model` into, cheaply (no training): lets check() chain steps."""
        return QuantizedPreview(model) if self.produces_int8 else model

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if k not in ("key", "needs_ensemble") and not k.startswith("_") and not k.endswith("_")
        )
        return f"{type(self).__name__}({args})"


def finetune(
    net: nn.Module,
    ctx: CompressContext,
    epochs: int,
    lr: float | None,
    module_cls: type[LitClassifier] = LitClassifier,
    **module_kwargs: Any,
) -> nn.Module:
    """Train `net` in place for `epochs` with the job's trainer/optimizer (lr overridable).

    `module_cls` swaps the loss (distillation); it gets the net, the optimizer and `module_kwargs`.
    `max_steps` is reset so a job trained for a fixed step budget does not fine-tune that long;
    validation is skipped (nothing here logs it).
    """
    if epochs <= 0:
        return net
    overrides = {"max_epochs": epochs, "max_steps": -1, "limit_val_batches": 0}
    # every weight trains here (optim.finetune's probe modes are for members)
    optim = {**dict(ctx.optim), **({"lr": lr} if lr is not None else {}), "finetune": "full"}
    module = module_cls(net, optimizer=optim.pop("name", "adam"), **optim, **module_kwargs)
    net.train()  # Lightning keeps the modes it is given: in eval mode BatchNorm and dropout would not train
    what = "distillation" if module_cls is not LitClassifier else "fine-tuning"
    fit(module, ctx.datamodule, ctx.trainer, callbacks=[MemberProgress(type(net).__name__, what=what)], **overrides)
    return net.cpu().eval()


def check_epochs(key: str, epochs: int, lr: float | None, name: str = "finetune_epochs") -> None:
    check(isinstance(epochs, int) and epochs >= 0, f"{key}.{name}", epochs, "an integer >= 0")
    check(lr is None or lr > 0, key + ".lr", lr, "null (the job's optim.lr) or a float > 0")


class Recipe:
    """Steps applied in order to a deep copy of the model; the input model is never changed."""

    def __init__(self, steps: list[Step] | None = None) -> None:
        self.steps = list(steps or [])
        for i, step in enumerate(self.steps):
            check(isinstance(step, Step), f"compress.steps[{i}]", step, "a compression step (runner.compress.*)")
            step.key = f"compress.steps[{i}]"

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def keeps_weights(self) -> bool:
        """Whether every step keeps the model's own weights (Step.keeps_weights)."""
        return all(step.keeps_weights for step in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Recipe({self.steps})"

    def check(self, model: nn.Module, spec: DataSpec, ensemble: bool | None = None, members: int | None = None) -> None:
        """Raise ConfigError if any step cannot handle `model` (an untrained net is fine) on the data
        `spec` describes. `ensemble=False` says no fusion strategy will provide an ensemble teacher;
        `members` is the job's number of members (steps with `check_members` check it).
        """
        for step in self.steps:
            step.check(model, spec)
            if ensemble is False:
                check(
                    not step.needs_ensemble,
                    step.key + ".teacher",
                    "ensemble",
                    "member (teacher: ensemble needs a fusion strategy, e.g. fuse=mean, and 2+ members)",
                )
            if members is not None and hasattr(step, "check_members"):
                step.check_members(members)
            model = step.preview(model)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        """The compressed copy of `model`; what the steps report is left in `self.stats_`."""
        model = copy_facts(model, copy.deepcopy(model)).cpu().eval()  # its head's name travels with it
        self.stats_: dict[str, float] = {}
        for step in self.steps:
            step.stats_ = {}
            model = step.apply(model, ctx)
            self.stats_.update(step.stats_)
        return model.eval()


def build_recipe(node: DictConfig | Mapping | None) -> Recipe:
    """The recipe of `cfg.compress` (null or no steps -> an empty recipe, which copies the model)."""
    if node is None:
        return Recipe([])
    steps = node.get("steps") if isinstance(node, (DictConfig, Mapping)) else None
    check(steps is None or isinstance(steps, (ListConfig, list)), "compress.steps", steps, "a list of steps")
    built = []
    for i, step in enumerate(steps or []):
        key = f"compress.steps[{i}]"
        check(
            isinstance(step, (DictConfig, Mapping)) and "_target_" in step,
            key,
            step,
            "a node with _target_ (e.g. runner.compress.MagnitudePrune)",
        )
        if not isinstance(step, DictConfig):
            step = OmegaConf.create(dict(step))
        # Non-recursive: a distillation student stays a config and is built per member.
        try:
            built.append(build(step, key, _recursive_=False))
        except ConfigError as e:  # constructors name their keys `compress.steps[].<name>`
            raise ConfigError(e.key.replace("compress.steps[]", key), e.value, e.allowed) from None
    return Recipe(built)


def _metric(metrics: Mapping[str, float], name: str) -> float | None:
    for key in (name, f"test/{name}"):
        if key in metrics:
            return float(metrics[key])
    return None


def speedup_interval(
    base_q25: float, base_q75: float, compressed_q25: float, compressed_q75: float
) -> dict[str, float]:
    """The spread of a speedup from the latency quartiles of both models.

    speedup_low = base q25 / compressed q75 and speedup_high = base q75 / compressed q25 (the
    slowest and fastest pairing of the middle halves); speedup_meaningful is 1.0 when the two
    interquartile ranges do not overlap (touching counts as overlap), else 0.0: a speedup, or a
    slowdown, that the timing noise of this machine cannot explain.
    """
    apart = base_q25 > compressed_q75 or compressed_q25 > base_q75
    return {
        "speedup_low": base_q25 / compressed_q75,
        "speedup_high": base_q75 / compressed_q25,
        "speedup_meaningful": 1.0 if apart else 0.0,
    }


def compression_report(base: Mapping[str, float], compressed: Mapping[str, float]) -> dict[str, float]:
    """delta/<metric> (compressed - base), compression_ratio (size), weight_ratio (weight_bytes,
    when both have it), zip_ratio (DEFLATE-compressed size), macs_ratio (base MACs / compressed MACs),
    speedup (base median latency / compressed median latency) and, when both have latency quartiles,
    speedup_low / speedup_high / speedup_meaningful (speedup_interval).

    Accepts evaluate_model() dicts with plain keys (`acc`) or the pipeline's (`test/acc`).
    """
    report: dict[str, float] = {}
    for name in ("acc", "precision", "recall", "f1", "nll", "ece"):
        a, b = _metric(base, name), _metric(compressed, name)
        if a is not None and b is not None:
            report[f"delta/{name}"] = b - a
    a, b = _metric(base, "size_bytes"), _metric(compressed, "size_bytes")
    if a and b:
        report["compression_ratio"] = a / b
    a, b = _metric(base, "zip_bytes"), _metric(compressed, "zip_bytes")
    if a and b:
        report["zip_ratio"] = a / b
    a, b = _metric(base, "weight_bytes"), _metric(compressed, "weight_bytes")
    if a and b:
        report["weight_ratio"] = a / b
    a, b = _metric(base, "macs"), _metric(compressed, "macs")
    if a and b:
        report["macs_ratio"] = a / b
    a, b = _metric(base, "latency_ms"), _metric(compressed, "latency_ms")
    if a and b:
        report["speedup"] = a / b
        quartiles = [_metric(m, f"latency_{q}_ms") for m in (base, compressed) for q in ("q25", "q75")]
        if all(quartiles):
            report.update(speedup_interval(*quartiles))
    a, b = _metric(compressed, "params"), _metric(compressed, "nonzero_params")
    if a and b is not None:
        report["nonzero_fraction"] = b / a
    return report

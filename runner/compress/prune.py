"""Pruning: unstructured magnitude pruning (one-shot or gradual) and plain fine-tuning.

Unstructured pruning keeps torch.nn.utils.prune masks while fine-tuning (pruned weights get no
update), then makes them permanent with prune.remove: the result is a plain model with zeros,
the same size on disk and as fast as before. Structured pruning, which rebuilds smaller layers,
is runner.compress.structured.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from runner.batches import DataSpec
from runner.compress.base import CompressContext, Step, check_epochs, finetune
from runner.compress.requirements import prunable
from runner.errors import check

SCOPES = ("global", "layer")
SCHEDULES = ("cubic", "linear")


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the prunable weights."""
    weights = [getattr(m, name) for m, name in prunable(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def _mask(targets: list[tuple[nn.Module, str]], sparsity: float, scope: str) -> None:
    """Attach masks zeroing the smallest-magnitude weights. Already-zero weights rank lowest,
    so a second call with higher sparsity extends the earlier mask."""
    _unmask(targets)
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=sparsity)


def _unmask(targets: list[tuple[nn.Module, str]]) -> None:
    for module, name in targets:
        if prune.is_pruned(module) and hasattr(module, name + "_orig"):
            prune.remove(module, name)


def _check_min_params_fit(key: str, model: nn.Module, min_params: int = 0) -> None:
    check(
        bool(prunable(model, min_params)),
        key + ".min_params",
        min_params,
        f"at most the largest layer's weight count ({max(m.weight.numel() for m, _ in prunable(model))})",
    )


def _check_min_params(min_params: int) -> None:
    check(
        isinstance(min_params, int) and min_params >= 0,
        "compress.steps[].min_params",
        min_params,
        "an integer >= 0 (layers with fewer weights stay dense)",
    )


class MagnitudePrune(Step):
    """Zero the `sparsity` fraction of weights with the smallest |w|, then fine-tune with the mask.

    scope=global ranks all layers' weights together (layers end up with different sparsity);
    scope=layer prunes every layer to the same sparsity. Layers with fewer than `min_params`
    weights stay dense (`sparsity` is then the fraction among the pruned layers' weights).
    """

    requires = frozenset({"float", "prunable_layers"})
    float_note = "prune before quantizing"

    def __init__(
        self,
        sparsity: float,
        scope: str = "global",
        finetune_epochs: int = 0,
        lr: float | None = None,
        min_params: int = 0,
    ) -> None:
        check(0.0 <= sparsity < 1.0, "compress.steps[].sparsity", sparsity, "a float in [0, 1)")
        check(scope in SCOPES, "compress.steps[].scope", scope, list(SCOPES))
        check_epochs("compress.steps[]", finetune_epochs, lr)
        _check_min_params(min_params)
        self.sparsity, self.scope, self.finetune_epochs, self.lr = sparsity, scope, finetune_epochs, lr
        self.min_params = min_params

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        super().check(model, spec)
        _check_min_params_fit(self.key, model, self.min_params)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        targets = prunable(model, self.min_params)
        _mask(targets, self.sparsity, self.scope)
        finetune(model, ctx, self.finetune_epochs, self.lr)
        _unmask(targets)
        return model


class GradualPrune(Step):
    """Raise sparsity over `rounds` of prune -> fine-tune (Zhu & Gupta 2017's cubic schedule:
    s_t = s_final * (1 - (1 - t/rounds)^3), front-loaded while there is much redundancy), then
    `final_epochs` more at the final sparsity. `min_params` as in MagnitudePrune."""

    requires = frozenset({"float", "prunable_layers"})
    float_note = "prune before quantizing"

    def __init__(
        self,
        sparsity: float,
        rounds: int = 5,
        epochs_per_round: int = 2,
        scope: str = "global",
        schedule: str = "cubic",
        lr: float | None = None,
        min_params: int = 0,
        final_epochs: int = 0,
    ) -> None:
        check(0.0 <= sparsity < 1.0, "compress.steps[].sparsity", sparsity, "a float in [0, 1)")
        check(isinstance(rounds, int) and rounds >= 1, "compress.steps[].rounds", rounds, "an integer >= 1")
        check(scope in SCOPES, "compress.steps[].scope", scope, list(SCOPES))
        check(schedule in SCHEDULES, "compress.steps[].schedule", schedule, list(SCHEDULES))
        check(
            isinstance(epochs_per_round, int) and epochs_per_round >= 0,
            "compress.steps[].epochs_per_round",
            epochs_per_round,
            "an integer >= 0",
        )
        check_epochs("compress.steps[]", final_epochs, lr, "final_epochs")
        _check_min_params(min_params)
        self.sparsity, self.rounds, self.epochs_per_round = sparsity, rounds, epochs_per_round
        self.scope, self.schedule, self.lr = scope, schedule, lr
        self.min_params, self.final_epochs = min_params, final_epochs

    def schedule_values(self) -> list[float]:
        fractions = [t / self.rounds for t in range(1, self.rounds + 1)]
        if self.schedule == "cubic":
            return [self.sparsity * (1 - (1 - f) ** 3) for f in fractions]
        return [self.sparsity * f for f in fractions]

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        super().check(model, spec)
        _check_min_params_fit(self.key, model, self.min_params)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        targets = prunable(model, self.min_params)
        for sparsity in self.schedule_values():
            _mask(targets, sparsity, self.scope)
            finetune(model, ctx, self.epochs_per_round, self.lr)
        finetune(model, ctx, self.final_epochs, self.lr)  # recover at the final sparsity
        _unmask(targets)
        return model


class FineTune(Step):
    """Plain fine-tuning with cross-entropy (e.g. between pruning and quantization).

    With keep_sparsity (default), weights that are exactly zero stay zero (masked while training),
    so a FineTune after a prune step does not undo the pruning.
    """

    requires = frozenset({"float"})
    float_note = "fine-tune before quantizing"

    def __init__(self, epochs: int, lr: float | None = None, keep_sparsity: bool = True) -> None:
        check_epochs("compress.steps[]", epochs, lr, "epochs")
        self.epochs, self.lr, self.keep_sparsity = epochs, lr, keep_sparsity

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        targets = [(m, n) for m, n in prunable(model) if bool((getattr(m, n) == 0).any())] if self.keep_sparsity else []
        for module, name in targets:
            prune.custom_from_mask(module, name, getattr(module, name).detach() != 0)
        finetune(model, ctx, self.epochs, self.lr)
        _unmask(targets)
        return model

"""Structured pruning of any architecture with Torch-Pruning's dependency graph (Fang et al., CVPR 2023).

Removing one channel forces removals elsewhere: the next layer's inputs, a BatchNorm's statistics,
every layer that adds into the same residual stream, the same dims of every attention head.
Torch-Pruning traces the model once on real inputs, gathers coupled channels into groups, ranks
each group's channels by an importance score and rebuilds smaller dense layers. This step decides
what stays (the classifier head; layers Torch-Pruning has no pruner for), how much goes (`amount`,
or as much as `macs_target` needs), when to fine-tune, and keeps the head bookkeeping of Hugging
Face attention modules in line with their pruned projections.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from runner.batches import DataSpec, Inputs, first_inputs, num_samples, split_batch, take, to_device
from runner.compress.base import CompressContext, Step, check_epochs, finetune
from runner.device import device_of
from runner.errors import ConfigError, check
from runner.measure import count_macs
from runner.models.adapter import head_module

log = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "random")
SCOPES = ("global", "uniform")
ATTENTION = ("dims", "heads")
# Layers kept whole. Torch-Pruning has no pruner for GRU / RNN cells or Bilinear (it would trace a
# GRU's internal ops as element-wise and its weights as loose parameters); embedding tables are
# indexed by token ids and their width is a transformer's residual stream, so it stays too.
UNPRUNABLE = (nn.Embedding, nn.EmbeddingBag, nn.GRU, nn.RNN, nn.RNNCellBase, nn.Bilinear)
TRACE_SAMPLES = 8  # inputs the dependency graph is traced on
TAYLOR_BATCHES = 4  # training batches whose loss gradients rank channels (importance=taylor)
MACS_INCREMENT = 0.02  # macs_target: channels go in steps of 2% of the original width, MACs recounted each time
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))  # BERT-style, ViT / LLaMA-style


class StructuredPrune(Step):
    """Remove whole channels / neurons / head dims and rebuild smaller dense layers, then fine-tune.

    Works on any model Torch-Pruning can trace: MLPs, CNNs with BatchNorm, residual additions,
    depthwise convs, Hugging Face ViT / BERT attention and MLP blocks.

    amount: fraction of channels removed, in every group for scope=uniform, overall for
      scope=global (channels ranked across layers, so widths end up different); with
      `macs_target`, the most that may go. Torch-Pruning keeps int(width * (1 - amount)).
    importance: l1 / l2 (group magnitude of the coupled weights), taylor (|w * dL/dw|, from
      TAYLOR_BATCHES training batches before every pruning step), bn_scale (|BatchNorm gamma|,
      network slimming; refused for a model without BatchNorm, and groups without one stay
      whole), random.
    iterative_steps: prune in this many steps (linear schedule), fine-tuning `finetune_epochs`
      after each; then `final_epochs` more. `lr` null: the job's optim.lr.
    macs_target: prune until base MACs / pruned MACs >= macs_target (2.0 = half the MACs),
      in increments of MACS_INCREMENT of the channels; the i-th of `iterative_steps` steps
      stops at macs_target ** (i / iterative_steps).
    round_to: keep channel counts multiples of this (e.g. 8 for tensor cores).
    attention: dims removes the same head dims from every head (head count kept); heads removes
      whole heads (one step only: Torch-Pruning re-applies the cumulative head ratio to the
      heads left at each iterative step).

    The classifier head always keeps its outputs; the stats are params / MACs per sample before
    and after and the number of layers kept whole (the head included). Pruned Hugging Face
    attention keeps its softmax scaling (that of the original head size), so its scores are the
    original's with the removed dims zeroed; the model's `config` still describes the unpruned widths.
    """

    requires = frozenset({"float"})
    float_note = "prune before quantizing"

    def __init__(
        self,
        amount: float = 0.5,
        importance: str = "l2",
        scope: str = "uniform",
        iterative_steps: int = 1,
        finetune_epochs: int = 0,
        final_epochs: int = 0,
        lr: float | None = None,
        macs_target: float | None = None,
        round_to: int | None = None,
        attention: str = "dims",
    ) -> None:
        key = "compress.steps[]"
        number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
        check(number and 0.0 <= amount < 1.0, f"{key}.amount", amount, "a float in [0, 1)")
        check(importance in IMPORTANCES, f"{key}.importance", importance, list(IMPORTANCES))
        check(scope in SCOPES, f"{key}.scope", scope, list(SCOPES))
        check(
            isinstance(iterative_steps, int) and not isinstance(iterative_steps, bool) and iterative_steps >= 1,
            f"{key}.iterative_steps",
            iterative_steps,
            "an integer >= 1",
        )
        check_epochs(key, finetune_epochs, lr)
        check_epochs(key, final_epochs, lr, "final_epochs")
        check(
            macs_target is None
            or (isinstance(macs_target, (int, float)) and not isinstance(macs_target, bool) and macs_target > 1),
            f"{key}.macs_target",
            macs_target,
            "null or a float > 1 (base MACs / pruned MACs, e.g. 2.0 = half the MACs)",
        )
        check(
            macs_target is None or amount > 0,
            f"{key}.amount",
            amount,
            "a float in (0, 1) with macs_target: the most that may be pruned",
        )
        check(
            round_to is None or (isinstance(round_to, int) and not isinstance(round_to, bool) and round_to >= 1),
            f"{key}.round_to",
            round_to,
            "null or an integer >= 1",
        )
        check(attention in ATTENTION, f"{key}.attention", attention, list(ATTENTION))
        check(
            attention == "dims" or (iterative_steps == 1 and macs_target is None),
            f"{key}.attention",
            attention,
            "dims with iterative_steps > 1 or macs_target (heads go in one step)",
        )
        self.amount, self.importance, self.scope = amount, importance, scope
        self.iterative_steps, self.finetune_epochs, self.final_epochs, self.lr = (
            iterative_steps,
            finetune_epochs,
            final_epochs,
            lr,
        )
        self.macs_target, self.round_to, self.attention = macs_target, round_to, attention
        self._example: Inputs | None = None  # real inputs seen by check(), to trace preview()'s model on
        self._previewed: tuple[nn.Module, nn.Module] | None = None

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        """Prune a copy of `model` on the data's example inputs, as apply will (no fine-tuning):
        a model Torch-Pruning cannot trace, with nothing prunable or whose pruned copy no longer
        gives (batch, num_classes) logits fails here, before any training."""
        super().check(model, spec)
        if self.importance == "bn_scale":
            check(
                any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
                self.key + ".importance",
                self.importance,
                "l1, l2, taylor or random for a model without BatchNorm (bn_scale ranks channels by BN gamma)",
            )
        self._example = take(spec.example, slice(0, TRACE_SAMPLES))
        pruned = copy.deepcopy(model).cpu().eval()
        try:
            stats = self._prune(pruned, self._example, spec.num_classes, self._check_gradients())
            with torch.no_grad():
                out = pruned(self._example)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever Torch-Pruning trips on, say so before training
            raise ConfigError(
                self.key,
                type(model).__name__,
                f"a model Torch-Pruning can trace and prune (it failed with {type(e).__name__}: {e})",
            ) from None
        n = num_samples(self._example)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        check(
            shape == (n, spec.num_classes),
            self.key,
            type(model).__name__,
            f"a model whose pruned copy still returns ({n}, {spec.num_classes}) logits (got {shape})",
        )
        if self.macs_target is not None:
            reached = stats["prune/macs_before"] / stats["prune/macs_after"]
            check(
                reached >= self.macs_target,
                self.key + ".macs_target",
                self.macs_target,
                f"at most {reached:.2f} for {type(model).__name__} with amount={self.amount} (amount caps "
                "the fraction of channels removed: raise it)",
            )
        self._previewed = (model, pruned)

    def preview(self, model: nn.Module) -> nn.Module:
        """The pruned copy of `model` (no fine-tuning), traced on the inputs check() last saw."""
        if self._previewed is not None and self._previewed[0] is model:
            pruned, self._previewed = self._previewed[1], None
            return pruned
        if self._example is None:
            raise RuntimeError("StructuredPrune.preview needs example inputs: call check(model, spec) first")
        pruned = copy.deepcopy(model).cpu().eval()
        self._prune(pruned, self._example, _num_outputs(pruned, self._example), self._check_gradients())
        return pruned

    def _check_gradients(self) -> Callable[[nn.Module], None] | None:
        return _self_labelled(self._example) if self.importance == "taylor" else None

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        example = first_inputs(ctx.datamodule.val_dataloader(), TRACE_SAMPLES)
        gradients = None
        if self.importance == "taylor":
            gradients = lambda net: _loss_gradients(net, ctx.datamodule.train_dataloader())  # noqa: E731
        self.stats_ = self._prune(
            model,
            example,
            ctx.datamodule.num_classes,
            gradients,
            lambda: finetune(model, ctx, self.finetune_epochs, self.lr),
        )
        finetune(model, ctx, self.final_epochs, self.lr)
        if self.macs_target is not None:
            reached = self.stats_["prune/macs_before"] / self.stats_["prune/macs_after"]
            if reached < self.macs_target:
                log.warning(
                    "%s: MACs reduced %.2fx, short of macs_target=%s at amount=%s",
                    self.key,
                    reached,
                    self.macs_target,
                    self.amount,
                )
        return model

    # --- the pruning itself --------------------------------------------------------------------

    def _prune(
        self,
        model: nn.Module,
        example: Inputs,
        num_classes: int,
        gradients: Callable[[nn.Module], None] | None,
        between_steps: Callable[[], Any] = lambda: None,
    ) -> dict[str, float]:
        """Prune `model` in place; returns the stats. `gradients(model)` fills .grad before each
        pruning step (importance=taylor); `between_steps()` runs after each of the iterative steps."""
        one = take(example, slice(0, 1))
        params_before, macs_before = _params(model), _macs(model, one)
        ignored = self._ignored(model, num_classes)
        attention = _attention_modules(model)
        pruner = self._pruner(model, example, ignored, attention)
        if not any(
            True
            for _ in pruner.DG.get_all_groups(
                ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
            )
        ):
            kept = ", ".join(
                f"{name} ({type(m).__name__})" for name, m in model.named_modules() if any(m is i for i in ignored)
            )
            raise ConfigError(
                self.key,
                type(model).__name__,
                "a model with layers Torch-Pruning can prune besides "
                f"the classifier head (kept whole here: {kept or 'none'})",
            )
        if self.macs_target is None:
            for _ in range(self.iterative_steps):
                self._step(pruner, model, gradients, attention)
                between_steps()
        else:
            check(
                macs_before > 0,
                self.key + ".macs_target",
                self.macs_target,
                f"null for {type(model).__name__}: torch's FlopCounterMode counts no MACs in it",
            )
            macs = macs_before
            for i in range(1, self.iterative_steps + 1):
                goal = self.macs_target ** (i / self.iterative_steps)
                while macs_before / macs < goal and pruner.current_step < pruner.iterative_steps:
                    self._step(pruner, model, gradients, attention)
                    macs = _macs(model, one)
                between_steps()
        model.zero_grad(set_to_none=True)
        head = _classifier(model, num_classes)
        if isinstance(getattr(model, "feature_dim", None), int) and isinstance(head, nn.Linear):
            model.feature_dim = head.in_features  # our nets' features are the head's input
        return {
            "prune/params_before": float(params_before),
            "prune/params_after": float(_params(model)),
            "prune/macs_before": macs_before,
            "prune/macs_after": _macs(model, one),
            "prune/ignored_layers": float(sum(isinstance(m, nn.Module) for m in ignored)),
        }

    def _ignored(self, model: nn.Module, num_classes: int) -> list[nn.Module | nn.Parameter]:
        """The classifier head and the layers Torch-Pruning cannot prune (one log line each), with
        the latter's own parameters so they are not taken for loose prunable ones."""
        head = _classifier(model, num_classes)
        ignored: list[nn.Module | nn.Parameter] = [head] if head is not None else []
        for name, m in model.named_modules():
            if isinstance(m, UNPRUNABLE) and m is not head:
                log.info("%s: %s (%s) is kept whole: Torch-Pruning cannot prune it", self.key, name, type(m).__name__)
                ignored += [m, *m.parameters(recurse=False)]
        return ignored

    def _pruner(
        self, model: nn.Module, example: Inputs, ignored: list, attention: list[tuple[nn.Module, list[nn.Linear]]]
    ) -> tp.pruner.BasePruner:
        num_heads = {}
        for module, layers in attention:
            head_dim = layers[0].out_features // _heads(module)
            num_heads.update({layer: layer.out_features // head_dim for layer in layers})
        steps = self.iterative_steps if self.macs_target is None else max(1, math.ceil(self.amount / MACS_INCREMENT))
        with _quiet(), torch.enable_grad():
            # fresh dicts: Torch-Pruning mutates its mutable defaults, which would leak between pruners
            return tp.pruner.BasePruner(
                model,
                example,
                importance=_importance(self.importance),
                pruning_ratio=self.amount,
                global_pruning=self.scope == "global",
                iterative_steps=steps,
                ignored_layers=ignored,
                round_to=self.round_to,
                num_heads=num_heads,
                prune_num_heads=self.attention == "heads",
                prune_head_dims=self.attention == "dims",
                head_pruning_ratio=self.amount if self.attention == "heads" else 0.0,
                in_channel_groups={},
                out_channel_groups={},
                forward_fn=lambda m, x: m(x),
            )  # our models take the dict of a text batch as one argument

    def _step(
        self,
        pruner: tp.pruner.BasePruner,
        model: nn.Module,
        gradients: Callable[[nn.Module], None] | None,
        attention: list[tuple[nn.Module, list[nn.Linear]]],
    ) -> None:
        if gradients is not None:
            gradients(model)
        with _quiet():
            pruner.step()
        for module, (q, k, _) in attention:  # what the HF examples of Torch-Pruning update by hand
            heads = pruner.num_heads[q]
            head_dim = q.out_features // heads
            for name, value in (
                ("num_attention_heads", heads),
                ("num_heads", heads),
                ("head_dim", head_dim),
                ("attention_head_size", head_dim),
                ("all_head_size", q.out_features),
                ("num_key_value_heads", k.out_features // head_dim),
            ):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, value)


# --- helpers -----------------------------------------------------------------------------------


def _importance(name: str) -> tp.importance.Importance:
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance,
        "bn_scale": tp.importance.BNScaleImportance,
        "random": tp.importance.RandomImportance,
    }[name]()


def _classifier(model: nn.Module, num_classes: int) -> nn.Module | None:
    """The layer producing the logits: the adapter's head, else the last Linear with num_classes outputs."""
    try:
        head = head_module(model)
    except ConfigError:
        head = None
    if isinstance(head, nn.Linear) and head.out_features == num_classes:
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return linears[-1] if linears else head


def _heads(module: nn.Module) -> int:
    heads = getattr(module, "num_attention_heads", None)
    return heads if isinstance(heads, int) else getattr(module, "num_heads", None)


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(attention module, [q, k, v] Linear layers) of every multi-head attention built from
    separate projections (Hugging Face BERT, ViT, LLaMA-style)."""
    found = []
    for m in model.modules():
        if not isinstance(_heads(m), int):
            continue
        for names in QKV_NAMES:
            layers = [getattr(m, n, None) for n in names]
            if all(isinstance(layer, nn.Linear) for layer in layers):
                found.append((m, layers))
                break
    return found


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _macs(model: nn.Module, one: Inputs) -> float:
    return float(count_macs(model, one) or 0.0)


def _num_outputs(model: nn.Module, x: Inputs) -> int:
    with torch.no_grad():
        return model.eval()(x).shape[1]


def _loss_gradients(model: nn.Module, batches: Iterable, n: int = TAYLOR_BATCHES) -> None:
    """Cross-entropy gradients summed over `n` batches into .grad, in eval mode (BatchNorm's
    running statistics stay as trained)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    device = device_of(model)
    with torch.enable_grad():
        for _, batch in zip(range(n), batches):
            x, y = split_batch(batch)
            F.cross_entropy(model(to_device(x, device)), y.to(device)).backward()


def _self_labelled(x: Inputs) -> Callable[[nn.Module], None]:
    """Gradients where no labels are at hand (check, preview): the model's own predictions as labels."""

    def gradients(model: nn.Module) -> None:
        with torch.no_grad():
            y = model.eval()(x).argmax(1)
        _loss_gradients(model, [(x, y)], 1)

    return gradients


@contextmanager
def _quiet() -> Iterator[None]:
    """Torch-Pruning's warnings (loose parameters found, recursion limits on traced RNN ops) to the debug log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(str(w.message) for w in caught):
        log.debug("torch-pruning: %s", message)

"""Wanda: pruning by weights and activations (Sun et al. 2024, "A Simple and Effective Pruning Approach
for Large Language Models", ICLR 2024).

A weight's importance is |W_ij| * ||X_j||_2: its magnitude times the L2 norm of the input feature it
multiplies, over the calibration inputs (every row the layer sees: every real token of every text, or
every sample). Weights are compared within each output row (each neuron's own inputs: the paper's
comparison group, which beat a layer-wide or global ranking for LLMs), and the lowest go: the same
fraction of every row (unstructured), or all but the N highest of every M consecutive inputs of a row
(N:M, e.g. 2:4, the pattern sparse tensor cores run). No weight update, no fine-tuning by default.

Procedure, as the paper's code (`prune_wanda`): the calibration inputs go through the model, and
layers are pruned block by block in the order the forward pass reaches them, each block's Linears
scored together on the inputs they get with the blocks before already pruned (the paper's loop over
a decoder's layers). A block is an element of the model's outermost list of like modules (an
nn.ModuleList or nn.Sequential of modules of one class: BERT's `encoder.layer`, Llama's `layers`);
Linears outside any block (an MLP's) go one by one, those that receive the very same input tensor
together. Each group costs one pass over the calibration batches, cut short where the next group
starts, so a model of L blocks costs about L/2 forward passes of the batches (the paper runs each
block on cached inputs instead, which needs the blocks' call arguments). `sequential: false`: one
pass, every layer scored on the dense model's inputs.

`score: magnitude` is the paper's magnitude baseline in the same comparison group (its Table 8's
"weight magnitude, per output"): |W_ij| alone, on the very layers and rows Wanda prunes, no calibration
input read; what differs from `score: wanda` is then only the ||X_j|| factor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from runner.batches import DataSpec, Inputs, split_batch, to_device
from runner.compress.base import CompressContext, Step, check_epochs, finetune
from runner.compress.prune import _check_min_params, _unmask, weight_sparsity
from runner.compress.requirements import body_linears
from runner.device import job_device, on_device
from runner.errors import check

SCORES = ("wanda", "magnitude")
MASK_KEY = "attention_mask"  # the dict input whose zeros mark padding tokens (not counted)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured"; (N, M) for "N:M" (keep N of every M consecutive inputs, 0 < N < M)."""
    if pattern == "unstructured":
        return None
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    check(
        found is not None and 0 < int(found[1]) < int(found[2]),
        "compress.steps[].pattern",
        pattern,
        'unstructured, or "N:M" with 0 < N < M (keep N of every M consecutive inputs, e.g. 2:4, 4:8)',
    )
    return int(found[1]), int(found[2])


def wanda_keep(weight: Tensor, norms: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
    """True where a weight of `weight` (out, in) survives, scored |W_ij| * norms_j within each row.

    unstructured: floor(sparsity * in) lowest of each row go (the paper's int(); the epsilon keeps
    0.29 * 100 at 29); N:M: the M - N lowest of every M consecutive inputs of each row go. Ties go
    in index order (a stable sort: the first of equal scores is pruned first).
    """
    score = weight.detach().abs().double() * norms.double().to(weight.device)[None, :]
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    if nm is None:
        k = math.floor(sparsity * cols + 1e-9)
        order = torch.sort(score, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :k], False)
        return keep
    n, m = nm
    groups = score.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices
    return keep.reshape(rows, cols // m, m).scatter_(-1, order[..., : m - n], False).reshape(rows, cols)


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """A Linear's input as rows of features: (tokens, in) where an attention mask of the batch fits
    the input's leading dims (only real tokens), else every row."""
    x = x.detach()
    if mask is not None:
        if x.dim() >= 3 and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask.bool()]
        if x.dim() == 2 and mask.dim() >= 2 and x.shape[0] == mask.numel():  # (batch * tokens, in)
            return x[mask.reshape(-1).bool()]
    return x.reshape(-1, x.shape[-1])


def _version(x: Tensor) -> int:
    """The tensor's version counter (in-place changes bump it); -1 for an inference tensor, which has none."""
    try:
        return x._version
    except RuntimeError:
        return -1


class _Stop(Exception):
    """Ends a calibration forward pass once the layers scored in it have all been seen."""


def blocks_of(model: nn.Module, layers: list[nn.Module]) -> dict[nn.Module, nn.Module]:
    """The block each of `layers` sits in: the element of the outermost list of like modules (an
    nn.ModuleList or nn.Sequential of 2+ modules of one class) that holds it; layers in no such list
    are left out."""
    found: dict[nn.Module, nn.Module] = {}
    wanted = set(layers)
    for module in model.modules():  # parents before children: the outermost list claims a layer first
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        for child in module:
            for inner in child.modules():
                if inner in wanted and inner not in found:
                    found[inner] = child
    return found


class InputNorms:
    """Squared L2 norms of each input feature of some Linear layers over calibration inputs, gathered
    by forward pre-hooks (`with norms.hooked(layers)`, then run the model on each batch via `run`).

    `blocks` given (sequential scoring): only the first group the pass reaches is scored, the hooked
    layers of the block (blocks_of) of the first hooked layer called or, for a layer in no block, the
    layers called with that same, unmodified input tensor; the pass stops at the next hooked layer
    outside the group. Otherwise every call of every hooked layer counts. `rows` counts the rows each
    layer saw."""

    def __init__(self, blocks: dict[nn.Module, nn.Module] | None = None) -> None:
        self.blocks = blocks
        self.sumsq: dict[nn.Module, Tensor] = {}
        self.rows: dict[nn.Module, int] = {}
        self.group: list[nn.Module] = []  # the layers scored, in the order the pass reached them
        self._mask: Tensor | None = None
        self._current: tuple[nn.Module | None, Tensor, int] | None = None  # the group's block, input, version

    def _in_group(self, module: nn.Module, x: Tensor) -> bool:
        block = self.blocks.get(module)
        if self._current is None:
            self._current = (block, x, _version(x))
            return True
        current, first, version = self._current
        if current is not None:
            return block is current
        return block is None and x is first and _version(x) == version

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["input"]
        if self.blocks is not None and not self._in_group(module, x):
            raise _Stop  # a later group: its inputs may depend on this group's (unpruned) outputs
        rows = _rows(x, self._mask).double()
        if module not in self.sumsq:
            self.sumsq[module] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.rows[module] = 0
        self.sumsq[module] += rows.pow(2).sum(0)
        self.rows[module] += rows.shape[0]
        if module not in self.group:
            self.group.append(module)

    @contextmanager
    def hooked(self, layers: list[nn.Module]) -> Iterator[InputNorms]:
        handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(self, model: nn.Module, x: Inputs) -> None:
        self._mask = x.get(MASK_KEY) if isinstance(x, dict) else None
        self._current = None
        try:
            model(x)
        except _Stop:
            pass
        finally:
            self._mask, self._current = None, None

    def norms(self, layer: nn.Module) -> Tensor:
        return self.sumsq[layer].sqrt()


class Wanda(Step):
    """Prune every Linear but the classifier head by |W| * ||X|| within each output row (module docstring).

    sparsity: the fraction of each row's weights that go (unstructured); with an N:M `pattern` it
    must be 1 - N/M (0.5 for 2:4). pattern: "unstructured" or "N:M" (layers whose input width is not
    a multiple of M stay dense). calibration_batches: how many training batches are the calibration
    inputs (the train split only: what is scored on is never what is evaluated). min_params: layers
    with fewer weights stay dense. sequential: score each block's layers on the inputs the already
    pruned blocks before it give (the paper's procedure; false: one pass over the dense model).
    finetune_epochs / lr: fine-tuning with the masks kept (as MagnitudePrune; the paper: none).
    score: wanda (|W| * ||X||) or magnitude (|W| alone, the same layers and rows: the baseline).

    Inputs with an `attention_mask` (token ids): only real tokens' rows count, where the mask fits a
    layer's input (B, T, in); padding rows are computed by the model but no real token reads them, so
    they would skew the norms. Layers whose input has no token axis (a pooled vector) count every row.
    Calibration runs on the job's device. stats_: `wanda/sparsity` (zeros among the pruned layers'
    weights), `wanda/model_sparsity` (among every Linear / Conv weight), `wanda/layers`,
    `wanda/dense_layers` (Linears besides the head left dense: min_params, N:M width, or never
    called on the calibration inputs),
    `wanda/calibration_rows` (rows the first layer was scored on: real tokens, or samples),
    `wanda/passes`, and with N:M `wanda/nm_groups_ok` (the fraction of M-groups with at most N nonzeros).
    """

    requires = frozenset({"float", "linear_layers"})
    float_note = "prune before quantizing"

    def __init__(
        self,
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        calibration_batches: int = 8,
        min_params: int = 0,
        sequential: bool = True,
        finetune_epochs: int = 0,
        lr: float | None = None,
        score: str = "wanda",
    ) -> None:
        check(score in SCORES, "compress.steps[].score", score, list(SCORES))
        check(
            isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0,
            "compress.steps[].sparsity",
            sparsity,
            "a float in [0, 1)",
        )
        nm = parse_pattern(pattern)
        if nm is not None:
            check(
                math.isclose(sparsity, 1 - nm[0] / nm[1], abs_tol=1e-9),
                "compress.steps[].sparsity",
                sparsity,
                f"1 - N/M = {1 - nm[0] / nm[1]:g} with pattern {pattern} (N:M sets the sparsity)",
            )
        check(
            isinstance(calibration_batches, int) and calibration_batches >= 1,
            "compress.steps[].calibration_batches",
            calibration_batches,
            "an integer >= 1",
        )
        _check_min_params(min_params)
        check(isinstance(sequential, bool), "compress.steps[].sequential", sequential, [True, False])
        check_epochs("compress.steps[]", finetune_epochs, lr)
        self.sparsity, self.pattern, self.calibration_batches = float(sparsity), pattern, calibration_batches
        self.min_params, self.sequential, self.finetune_epochs, self.lr = min_params, sequential, finetune_epochs, lr
        self._nm, self.score = nm, score

    def targets(self, model: nn.Module) -> list[nn.Linear]:
        """The layers this step prunes: every Linear but the head, with >= min_params weights and, for
        N:M, an input width that is a multiple of M."""
        layers = body_linears(model, self.min_params)
        return [m for m in layers if self._nm is None or m.in_features % self._nm[1] == 0]

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        super().check(model, spec)
        widest = max(m.weight.numel() for m in body_linears(model))
        check(
            bool(body_linears(model, self.min_params)),
            self.key + ".min_params",
            self.min_params,
            f"at most the largest Linear's weight count besides the head ({widest})",
        )
        if self._nm is not None:
            widths = sorted({m.in_features for m in body_linears(model, self.min_params)})
            check(
                bool(self.targets(model)),
                self.key + ".pattern",
                self.pattern,
                f"an N:M whose M divides some Linear's input width ({widths})",
            )

    def calibration_inputs(self, ctx: CompressContext) -> list[Inputs]:
        """The first `calibration_batches` batches of the training split, on the CPU."""
        batches = []
        for i, batch in enumerate(ctx.datamodule.train_dataloader()):
            if i >= self.calibration_batches:
                break
            batches.append(to_device(split_batch(batch)[0], "cpu"))
        return batches

    @torch.no_grad()
    def prune_in_place(self, model: nn.Module, batches: list[Inputs], device: Any = "cpu") -> dict[nn.Module, Tensor]:
        """Zero the weights Wanda removes (module docstring); the masks kept, by layer."""
        model.eval()
        if self.score == "magnitude":  # |W| alone: no calibration pass
            masks = {}
            for layer in self.targets(model):
                masks[layer] = wanda_keep(layer.weight, torch.ones(layer.in_features), self.sparsity, self._nm)
                layer.weight.mul_(masks[layer].to(layer.weight.dtype))
            self.stats_ = {"wanda/passes": 0.0, "wanda/calibration_rows": 0.0}
            return masks
        pending, masks, rows, passes = self.targets(model), {}, [], 0
        blocks = blocks_of(model, pending) if self.sequential else None
        while pending:
            norms = InputNorms(blocks)
            with norms.hooked(pending):
                for x in batches:
                    norms.run(model, to_device(x, device))
            passes += 1
            group = norms.group  # a layer no calibration input reaches is never scored: it stays dense
            if not group:
                break
            for layer in group:
                keep = wanda_keep(layer.weight, norms.norms(layer), self.sparsity, self._nm)
                layer.weight.mul_(keep.to(layer.weight.dtype))
                masks[layer] = keep
                rows.append(norms.rows[layer])
            pending = [layer for layer in pending if layer not in masks]
        self.stats_ = {"wanda/passes": float(passes), "wanda/calibration_rows": float(rows[0] if rows else 0)}
        return masks

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        batches = self.calibration_inputs(ctx) if self.score == "wanda" else []
        with on_device(model, job_device(ctx.trainer)) as where:
            masks = self.prune_in_place(model, batches, where)
        masks = {layer: keep.cpu() for layer, keep in masks.items()}
        if self.finetune_epochs > 0:
            for layer, keep in masks.items():
                prune.custom_from_mask(layer, "weight", keep)
            finetune(model, ctx, self.finetune_epochs, self.lr)
            _unmask([(layer, "weight") for layer in masks])
        self.stats_.update(self._sparsity_stats(model, list(masks)))
        return model

    def _sparsity_stats(self, model: nn.Module, layers: list[nn.Module]) -> dict[str, float]:
        weights = [layer.weight.detach() for layer in layers]
        total = sum(w.numel() for w in weights)
        stats = {
            "wanda/sparsity": sum(int((w == 0).sum()) for w in weights) / max(total, 1),
            "wanda/model_sparsity": weight_sparsity(model),
            "wanda/layers": float(len(layers)),
            "wanda/dense_layers": float(len(body_linears(model)) - len(layers)),
        }
        if self._nm is not None:
            n, m = self._nm
            nonzero = [(w != 0).reshape(w.shape[0], -1, m).sum(-1) for w in weights]
            stats["wanda/nm_groups_ok"] = sum(int((c <= n).sum()) for c in nonzero) / max(
                sum(c.numel() for c in nonzero), 1
            )
        return stats

"""Feature distillation machinery (FitNets, Romero et al. 2015) for the Distill step: feature
pairs, forward hooks that catch the output (or, with `capture: input`, the input) of named
submodules, a probe of each feature's shape and layout, the learned projection
(`FeatureProjection`) of a student feature onto a teacher's, and the weighted MSE between them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from runner.batches import Inputs
from runner.errors import ConfigError, check

CAPTURES = ("output", "input")
FEATURE_KEYS = ("student", "teacher", "weight", "capture")

# Leaf layers whose 3-D outputs are (N, C, L) maps, and those whose 3-D outputs are (N, L, C) tokens.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_TOKENS = (nn.Linear, nn.LayerNorm, nn.RNNBase, nn.Embedding, nn.MultiheadAttention)


@dataclass(frozen=True)
class FeaturePair:
    """One FitNets hint: `student`'s feature regressed on `teacher`'s (module names, as in
    `named_modules()`); `capture` picks the module's output or its (first) input."""

    student: str
    teacher: str
    weight: float = 1.0
    capture: str = "output"


@dataclass(frozen=True)
class FeatureShape:
    """A probed feature: its per-sample shape and whether a 3-D one is (N, L, C) tokens."""

    shape: tuple[int, ...]
    tokens: bool = False


def _first_tensor(value: Any) -> Tensor | None:
    """The feature in a module's output: the tensor, or the first element of a tuple / mapping
    (an RNN's (output, h_n), a Hugging Face layer's outputs)."""
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, Tensor) else None


def _register(module: nn.Module, capture: str, fn: Callable[[Any], None]) -> RemovableHandle:
    if capture == "input":
        return module.register_forward_pre_hook(lambda _m, args: fn(args))
    return module.register_forward_hook(lambda _m, _args, out: fn(out))


class FeatureTaps:
    """Forward hooks keeping the latest feature of each named submodule of `model`.

    Every handle goes into `handles` (the caller's list), so the caller can remove them whatever
    happens in between; `remove()` removes this object's own.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        captures: Sequence[str],
        handles: list[RemovableHandle] | None = None,
    ) -> None:
        self.values: list[Tensor | None] = [None] * len(names)
        self.handles: list[RemovableHandle] = []
        for j, (name, capture) in enumerate(zip(names, captures)):
            self.handles.append(_register(model.get_submodule(name), capture, partial(self._keep, j)))
        if handles is not None:
            handles.extend(self.handles)

    def _keep(self, j: int, value: Any) -> None:
        self.values[j] = _first_tensor(value)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _modes(nets: Sequence[nn.Module]) -> dict[nn.Module, bool]:
    """Every submodule's training flag (`train(mode)` would set them all alike)."""
    return {m: m.training for net in nets for m in net.modules()}


def _restore(modes: dict[nn.Module, bool]) -> None:
    for module, mode in modes.items():
        module.training = mode


def _names_hint(model: nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return (
        f"a submodule name of {type(model).__name__}" + (f"; close: {close}" if close else "") + f"; available: {shown}"
    )


def _is_tokens(leaves: list[nn.Module]) -> bool:
    """Whether a 3-D feature is (N, L, C): decided by the last layer that ran before it which fixes
    a layout (convolutions, batch norms and pools give (N, C, L); Linear, LayerNorm, RNNs, attention
    and embeddings give tokens); activations, dropout and reshapes are skipped."""
    for leaf in reversed(leaves):
        if isinstance(leaf, _CHANNELS_FIRST):
            return False
        if isinstance(leaf, _TOKENS):
            return True
    return True


@torch.no_grad()
def probe_features(
    model: nn.Module, x: Inputs, names: Sequence[str], captures: Sequence[str], keys: Sequence[str]
) -> list[FeatureShape]:
    """One forward pass of `model` (in eval mode) on `x` with hooks on the named submodules: the
    shape of each feature. A name that is not a submodule, a module that does not run exactly once
    per forward pass or a feature that is not a float tensor of 2-4 dims is a ConfigError naming
    `keys[j]`. Every hook is removed before returning."""
    for name, key in zip(names, keys):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ConfigError(key, name, _names_hint(model, name)) from None
    leaves: list[nn.Module] = []
    seen: list[list[tuple[Tensor | None, bool]]] = [[] for _ in names]
    handles: list[RemovableHandle] = []
    modes = _modes([model])
    try:
        # leaves first: a hooked leaf is in `leaves` by the time its own feature hook runs
        for leaf in (m for m in model.modules() if next(m.children(), None) is None):
            handles.append(leaf.register_forward_hook(lambda m, _a, _o: leaves.append(m)))
        for j, (name, capture) in enumerate(zip(names, captures)):
            handles.append(
                _register(
                    model.get_submodule(name),
                    capture,
                    lambda v, j=j: seen[j].append((_first_tensor(v), _is_tokens(leaves))),
                )
            )
        model.eval()
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        _restore(modes)
    shapes = []
    for name, capture, key, calls in zip(names, captures, keys, seen):
        check(
            len(calls) == 1,
            key,
            name,
            f"a submodule of {type(model).__name__} that runs once per forward pass (this one ran {len(calls)} times)",
        )
        feat, tokens = calls[0]
        ok = feat is not None and feat.is_floating_point() and 2 <= feat.dim() <= 4
        got = "no tensor" if feat is None else f"{str(feat.dtype).removeprefix('torch.')} {tuple(feat.shape)}"
        check(
            ok,
            key,
            name,
            f"a submodule whose {capture} is a float tensor (N, C), (N, C, L), (N, L, C) or "
            f"(N, C, H, W); its {capture} is {got}",
        )
        shapes.append(FeatureShape(tuple(feat.shape[1:]), tokens and feat.dim() == 3))
    return shapes


def _channels_first(shape: FeatureShape) -> tuple[int, ...]:
    """(C, *spatial) of a feature, whatever its layout."""
    return (shape.shape[-1], *shape.shape[:-1]) if shape.tokens else shape.shape


class FeatureProjection(nn.Module):
    """Brings a student feature and a teacher feature to one shape (FitNets' regressor).

    The width is mapped by a learned layer where student and teacher differ: nn.Linear for
    (N, C) features and (N, L, C) tokens, a 1x1 nn.Conv1d / nn.Conv2d for (N, C, L) / (N, C, H, W)
    maps (an identity where widths agree). Where the spatial sizes (or token counts) differ, the
    larger is average-pooled (adaptive) to the smaller, per dimension. forward(student, teacher)
    returns both channels-first ((N, C, ...); tokens as (N, C, L)), ready for MSE.
    """

    def __init__(self, student: FeatureShape, teacher: FeatureShape) -> None:
        super().__init__()
        s, t = _channels_first(student), _channels_first(teacher)
        self.student_tokens, self.teacher_tokens = student.tokens, teacher.tokens
        size = tuple(min(a, b) for a, b in zip(s[1:], t[1:]))
        self.size = size if size != s[1:] or size != t[1:] else None
        if s[0] == t[0]:
            self.proj: nn.Module = nn.Identity()
        elif len(s) == 1 or student.tokens:
            self.proj = nn.Linear(s[0], t[0])
        else:
            self.proj = (nn.Conv1d if len(s) == 2 else nn.Conv2d)(s[0], t[0], 1)

    def extra_repr(self) -> str:
        return f"pool_to={self.size}, student_tokens={self.student_tokens}, teacher_tokens={self.teacher_tokens}"

    def _pool(self, f: Tensor) -> Tensor:
        if self.size is None or tuple(f.shape[2:]) == self.size:
            return f
        return (F.adaptive_avg_pool1d if f.dim() == 3 else F.adaptive_avg_pool2d)(f, self.size)

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        # pool before projecting: a 1x1 projection and average pooling commute, and pooling first is cheaper
        s = self._pool(student.transpose(1, 2) if self.student_tokens else student)
        t = self._pool(teacher.transpose(1, 2) if self.teacher_tokens else teacher)
        if isinstance(self.proj, nn.Linear) and s.dim() > 2:  # tokens: the width is the last dimension
            s = self.proj(s.transpose(1, 2)).transpose(1, 2)
        else:
            s = self.proj(s)
        return s, t


def check_pair_shapes(student: FeatureShape, teacher: FeatureShape, pair: FeaturePair, key: str) -> None:
    """The two features must have the same number of dimensions (after reading tokens as (N, C, L))."""
    ok = len(student.shape) == len(teacher.shape)
    what = lambda f: ("tokens " if f.tokens else "") + str((None, *f.shape))  # noqa: E731
    check(
        ok,
        key + ".teacher",
        pair.teacher,
        f"a teacher feature with as many dimensions as the student's: student {pair.student!r} gives "
        f"{what(student)}, teacher {pair.teacher!r} gives {what(teacher)} (N: batch). Pair (N, C) with (N, C), "
        "(N, C, L) or (N, L, C) with either, (N, C, H, W) with (N, C, H, W); e.g. name a Flatten or pooling "
        "module instead",
    )


def feature_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    projections: Sequence[FeatureProjection],
    weights: Sequence[float],
) -> Tensor:
    """sum_j weight_j * MSE(projection_j(student_j), teacher_j), each MSE the mean over all elements."""
    total = torch.zeros((), device=student_feats[0].device)
    for s, t, proj, w in zip(student_feats, teacher_feats, projections, weights):
        s, t = proj(s.float(), t.float())
        total = total + w * F.mse_loss(s, t)
    return total

"""Model merging in weight space: task arithmetic, TIES and DARE; SLERP of two members.

Members fine-tuned from one shared start theta_0 differ from it by task vectors
tau_i = theta_i - theta_0. A merge adds one combination of them back to the start:
theta_0 + scaling * combine(tau_1, ..., tau_M), where combine is the sum (task arithmetic), the
TIES merge (trim, elect sign, disjoint mean) or either of them after DARE's random drop. The
result is one network of the members' architecture, so the soups' checks and prediction code apply.

The start comes from outside the members: `prepare(members)` copies it from the members before they
train (the pipeline calls it), or `set_start(state_dict)` takes it as given. `scaling: null` picks the value with the
best validation accuracy from SCALING_GRID (ties: the lower validation NLL, then the smaller value).

Only floating-point parameters are merged. Floating-point buffers (BatchNorm running mean and
variance) are averaged over the members, as soups do: they are statistics of activations, not
trained weights, so a task vector of them means nothing, and theta_0 + scaling * sum(delta) can
make a running variance negative (scaling * M > 1), while a mean of variances is a valid variance.
Integer buffers (num_batches_tracked) are copied from the first member.

SLERP (`SLERP`, at the end) takes no task vectors: it interpolates between two members' weights along
the great circle, tensor by tensor, as mergekit's `slerp` merge does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from runner.batches import DataSpec
from runner.errors import ConfigError, check
from runner.fuse.base import check_is_fitted, member_probs
from runner.fuse.soup import _Soup, accuracy
from runner.models.facts import copy_facts, shared_start

SCALING_GRID = tuple(round(0.1 * k, 1) for k in range(1, 11))  # 0.1, 0.2, ..., 1.0
MERGE_REQUIREMENT = (
    "task arithmetic, TIES and DARE take task vectors theta_i - theta_0 from one shared start "
    "theta_0, so the members must be one architecture fine-tuned from one initial checkpoint (equal "
    "`init_id`); use ensemble=finetune5 or ensemble=soup5 (a shared start the runner pre-trains) or "
    "`ensemble.shared_init: true`, or an output-level strategy such as fuse=mean"
)
Vectors = list[dict[str, Tensor]]  # one task vector per member: parameter name -> tensor


def parameter_names(net: nn.Module) -> list[str]:
    """State-dict keys of the floating-point parameters (tied parameters under each of their names)."""
    names = {name for name, p in net.named_parameters(remove_duplicate=False) if p.is_floating_point()}
    return [k for k in net.state_dict() if k in names]


def trim(vectors: Vectors, density: float) -> Vectors:
    """Each task vector's top `density` fraction of entries by magnitude, the rest zeroed (TIES step 1).

    The ranking runs over all entries of one task vector together, as in the TIES paper's code
    (not tensor by tensor); round(density * n) entries are kept, at least one.
    """
    out = []
    for tau in vectors:
        flat = torch.cat([v.flatten() for v in tau.values()])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().topk(max(1, round(density * flat.numel()))).indices] = True
        out.append(_unflatten(flat * keep, tau))
    return out


def elect_signs(vectors: Vectors) -> dict[str, Tensor]:
    """The sign of the summed task vectors per entry (TIES step 2: the sign with the larger total
    magnitude); an entry whose sum is exactly 0 takes the majority of all elected signs, as in the
    TIES code."""
    signs = {k: torch.sign(sum(tau[k] for tau in vectors)) for k in vectors[0]}
    majority = torch.sign(sum(s.sum() for s in signs.values()))
    return {k: torch.where(s == 0, majority, s) for k, s in signs.items()}


def disjoint_mean(vectors: Vectors, signs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per entry, the mean over the members whose nonzero value has the elected sign (TIES step 3);
    0 where none has."""
    out = {}
    for k, sign in signs.items():
        stacked = torch.stack([tau[k] for tau in vectors])
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        out[k] = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


def ties(vectors: Vectors, density: float = 1.0) -> dict[str, Tensor]:
    """The TIES merge of task vectors: trim to `density`, elect signs, disjoint mean."""
    trimmed = trim(vectors, density) if density < 1.0 else vectors
    return disjoint_mean(trimmed, elect_signs(trimmed))


def dare(vectors: Vectors, drop_rate: float, generator: torch.Generator) -> tuple[Vectors, float]:
    """Every entry dropped with probability `drop_rate`, the survivors scaled by 1 / (1 - drop_rate)
    (so each entry keeps its expected value); returns the dropped vectors and the fraction dropped.
    Masks are drawn in member order, then state-dict order, from `generator` (CPU: reproducible)."""
    out, dropped, total = [], 0, 0
    for tau in vectors:
        kept = {}
        for k, v in tau.items():
            keep = torch.rand(v.shape, generator=generator) >= drop_rate
            kept[k] = v * keep.to(v.device) / (1.0 - drop_rate)
            dropped, total = dropped + int((~keep).sum()), total + keep.numel()
        out.append(kept)
    return out, dropped / max(total, 1)


def _unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k], i = flat[i : i + v.numel()].view_as(v), i + v.numel()
    return out


def _check_scaling(scaling: float | None) -> None:
    check(
        scaling is None
        or (
            isinstance(scaling, (int, float))
            and not isinstance(scaling, bool)
            and math.isfinite(scaling)
            and scaling > 0
        ),
        "fuse.scaling",
        scaling,
        f"null (chosen on val from {list(SCALING_GRID)}) or a number > 0",
    )


class Merge(_Soup):
    """Base class of task-vector merges; subclasses implement `merge_vectors(vectors)`.

    Call `prepare(members)` before they train, or `set_start(state_dict)` with their shared start,
    before `fit`. Fitted: `soup_` (the
    merged network, named as the soups name theirs), `scaling_`, `val_acc_`, `grid_val_acc_`
    (scaling -> val accuracy of each candidate), `member_val_acc_`, `n_members_`.
    """

    scaling: float | None
    requirement = MERGE_REQUIREMENT

    def prepare(self, members: Sequence[nn.Module]) -> Merge:
        """Keep the members' shared start (read before they train: runner.models.facts.shared_start)."""
        return self.set_start(shared_start(members))

    def set_start(self, state: Mapping[str, Tensor]) -> Merge:
        """The weights theta_0 every member was fine-tuned from (a state dict; copied)."""
        self._start = {k: v.detach().clone() for k, v in state.items()}
        return self

    def _refuse_starts(self, ids: Mapping[str, str]) -> None:
        raise ConfigError(
            "ensemble.shared_init", f"false (the members' init_id differ: {dict(ids)})", f"true ({MERGE_REQUIREMENT})"
        )

    def merge_vectors(self, vectors: Vectors) -> dict[str, Tensor]:
        """The combined task vector (before `scaling`) from one task vector per member."""
        raise NotImplementedError

    def _fit(self, members: list[nn.Module], x: Tensor, y: Tensor) -> None:
        start = self._checked_start(members[0])
        names = parameter_names(members[0])
        states = [m.state_dict() for m in members]
        vectors = [{k: _wide(s[k]) - _wide(start[k]).to(s[k].device) for k in names} for s in states]
        direction = self.merge_vectors(vectors)
        rest = {
            k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone()
            for k, v in states[0].items()
            if k not in direction
        }  # buffers: as average_state does

        def merged(lam: float) -> dict[str, Tensor]:
            return {
                **rest,
                **{k: (_wide(start[k]).to(d.device) + lam * d).to(states[0][k].dtype) for k, d in direction.items()},
            }

        net = copy_facts(members[0], copy.deepcopy(members[0])).eval()
        scores = {}
        for lam in [self.scaling] if self.scaling is not None else SCALING_GRID:
            net.load_state_dict(merged(lam))
            probs = member_probs([net], x)[0]
            nll = float(-probs[torch.arange(len(y)), y].clamp(min=1e-12).log().mean())
            scores[lam] = (float((probs.argmax(1) == y).double().mean()), -nll, -lam)
        self.scaling_ = max(scores, key=scores.get)  # best val accuracy, then val NLL, then the smaller value
        self.grid_val_acc_ = {lam: s[0] for lam, s in scores.items()}
        self.val_acc_ = self.grid_val_acc_[self.scaling_]
        net.load_state_dict(merged(self.scaling_))
        self.soup_ = net.eval()
        self.member_val_acc_ = [accuracy(m, x, y) for m in members]
        self.n_members_ = len(members)

    def stats(self) -> dict[str, float]:
        check_is_fitted(self, "scaling_")
        return {"fuse/scaling": float(self.scaling_)}

    def _checked_start(self, member: nn.Module) -> dict[str, Tensor]:
        start = getattr(self, "_start", None)
        if start is None:
            raise ConfigError(
                "fuse (shared start)",
                None,
                "the members' shared start theta_0: call "
                "strategy.prepare(members) before they train, or strategy.set_start(state_dict), before fit "
                "(the pipeline calls prepare)",
            )
        shapes = {k: tuple(v.shape) for k, v in member.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in start.items()}
        check(
            given == shapes,
            "fuse (shared start)",
            f"{len(given)} tensors",
            f"the members' state dict ({len(shapes)} tensors of the same names and shapes)",
        )
        return start


def _wide(t: Tensor) -> Tensor:
    """At least float32 for the arithmetic (bf16/fp16 weights are cast back after merging)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class TaskArithmetic(Merge):
    """Task arithmetic (Ilharco et al. 2023): theta_0 + scaling * sum_i tau_i.

    scaling: a number > 0, or None to pick it from SCALING_GRID by validation accuracy.
    """

    def __init__(self, scaling: float | None = None) -> None:
        _check_scaling(scaling)
        self.scaling = scaling

    def merge_vectors(self, vectors: Vectors) -> dict[str, Tensor]:
        return {k: sum(tau[k] for tau in vectors) for k in vectors[0]}


class TIES(Merge):
    """TIES-merging (Yadav et al. 2023): each task vector trimmed to its top `density` fraction by
    magnitude, a sign elected per entry by the summed trimmed vectors, the disjoint mean of the entries
    of that sign; theta_0 + scaling * that. scaling: a number > 0, or None (chosen on val)."""

    def __init__(self, density: float = 0.2, scaling: float | None = None) -> None:
        check(
            isinstance(density, (int, float)) and not isinstance(density, bool) and 0.0 < density <= 1.0,
            "fuse.density",
            density,
            "a fraction in (0, 1]: the share of each task vector's entries kept",
        )
        _check_scaling(scaling)
        self.density, self.scaling = density, scaling

    def merge_vectors(self, vectors: Vectors) -> dict[str, Tensor]:
        return ties(vectors, self.density)


class DARE(Merge):
    """DARE (Yu et al. 2024): every task-vector entry dropped with probability `drop_rate`, the rest
    rescaled by 1 / (1 - drop_rate), then combined by task arithmetic (`combine: sum`, DARE-TA) or by
    TIES' sign election and disjoint mean (`combine: ties`, DARE-TIES; the random drop replaces the
    magnitude trim, as in mergekit's dare_ties). `seed` makes the drop reproducible; fitted
    `dropped_fraction_` is the share of entries dropped."""

    COMBINE = ("sum", "ties")

    def __init__(
        self, drop_rate: float = 0.5, combine: str = "sum", scaling: float | None = None, seed: int = 0
    ) -> None:
        check(
            isinstance(drop_rate, (int, float)) and not isinstance(drop_rate, bool) and 0.0 <= drop_rate < 1.0,
            "fuse.drop_rate",
            drop_rate,
            "a probability in [0, 1)",
        )
        check(combine in self.COMBINE, "fuse.combine", combine, list(self.COMBINE))
        _check_scaling(scaling)
        check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "fuse.seed", seed, "an integer >= 0")
        self.drop_rate, self.combine, self.scaling, self.seed = drop_rate, combine, scaling, seed

    def merge_vectors(self, vectors: Vectors) -> dict[str, Tensor]:
        dropped, self.dropped_fraction_ = dare(vectors, self.drop_rate, torch.Generator().manual_seed(self.seed))
        if self.combine == "ties":
            return disjoint_mean(dropped, elect_signs(dropped))
        return {k: sum(tau[k] for tau in dropped) for k in dropped[0]}


# --- SLERP ----------------------------------------------------------------------------------------

DOT_THRESHOLD = 0.9995  # mergekit's: |cos| above it counts as colinear, and the tensors are interpolated linearly
SLERP_REQUIREMENT = (
    "SLERP interpolates between two networks fine-tuned from one shared start (mergekit applies it to two "
    "fine-tunes of one base model; independently initialised networks do not lie in one basin), so the "
    "members must be one architecture with one initial checkpoint (equal `init_id`); use ensemble=soup5 or "
    "ensemble=finetune5 with 'ensemble.seeds=[0,1]', or `ensemble.shared_init: true`, or an output-level "
    "strategy such as fuse=mean"
)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation of two tensors, as mergekit's `slerp`: the cosine of the angle
    between the flattened tensors picks s0 = sin((1 - t) theta) / sin(theta) and s1 = sin(t theta) /
    sin(theta), and the result is s0 * v0 + s1 * v1 of the tensors as they are (not normalised); where
    |cos| > `dot_threshold` (colinear), (1 - t) * v0 + t * v1. A tensor of norm <= `eps` is left
    unnormalised, as mergekit does. Computed in float64 (float32 on MPS), returned in v0's dtype."""
    return _slerp(t, v0, v1, dot_threshold, eps)[0]


def _slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float, eps: float) -> tuple[Tensor, bool]:
    """(slerp(t, v0, v1), whether it fell back to linear interpolation)."""
    dtype = torch.float32 if v0.device.type == "mps" else torch.float64
    a, b = v0.detach().to(dtype), v1.detach().to(device=v0.device, dtype=dtype)
    norm_a, norm_b = float(a.norm()), float(b.norm())
    dot = float(((a / norm_a if norm_a > eps else a) * (b / norm_b if norm_b > eps else b)).sum())
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).to(v0.dtype), True
    theta_0 = math.acos(dot)
    sin_theta_0 = math.sin(theta_0)
    theta_t = theta_0 * t
    s0, s1 = math.sin(theta_0 - theta_t) / sin_theta_0, math.sin(theta_t) / sin_theta_0
    return (s0 * a + s1 * b).to(v0.dtype), False


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


class SLERP(_Soup):
    """SLERP: spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion
    curves") of two members' weights, as model merging uses it (mergekit, Goddard et al. 2024,
    "Arcee's MergeKit: a toolkit for merging large language models"; its `slerp` merge method).

    Each floating-point tensor of member 0 (v0) and member 1 (v1) becomes `slerp(t, v0, v1)`: t = 0
    gives member 0, t = 1 member 1, and between them the path keeps to the arc between the two tensors'
    directions instead of the chord (whose midpoint is shorter than either), falling back to linear
    interpolation where they are colinear (|cos| > DOT_THRESHOLD). Floating buffers (BatchNorm
    statistics) are interpolated as mergekit interpolates every tensor (the coefficients are >= 0, so a
    running variance stays positive); integer buffers (num_batches_tracked) come from member 0.

    Exactly two members, of one architecture and one shared start (`requires`), as mergekit's slerp
    takes two fine-tunes of one base model. `t`: a fraction in [0, 1], or a mapping {substring: t}
    with a `default`, where a tensor takes the t of the first substring its state-dict name contains
    (mergekit's `filter`, e.g. {self_attn: 0.3, mlp: 0.7, default: 0.5}), else the default. Fitted:
    `soup_` (the interpolated network, named as the soups name theirs), `lerp_` (the names of the
    tensors interpolated linearly), `val_acc_`, `member_val_acc_`, `n_members_`.
    """

    requirement = SLERP_REQUIREMENT
    MEMBERS = 2  # mergekit's slerp: "expects exactly two models"

    def __init__(self, t: float | Mapping[str, float] = 0.5) -> None:
        if isinstance(t, Mapping):
            t = {k: v for k, v in t.items()}  # a plain dict (Hydra passes a DictConfig), in its order
            check("default" in t, "fuse.t", t, "a mapping {substring: t} with a `default` t for the other tensors")
            for key, value in t.items():
                check(isinstance(key, str) and key != "", "fuse.t", key, "substrings of tensor names as keys")
                check(_is_fraction(value), f"fuse.t.{key}", value, "a fraction in [0, 1] (0: member 0, 1: member 1)")
        else:
            check(
                _is_fraction(t),
                "fuse.t",
                t,
                "a fraction in [0, 1] (0: member 0, 1: member 1), or a mapping {substring: t} with a `default`",
            )
        self.t = t

    def t_for(self, name: str) -> float:
        """The t of the tensor `name`: the first filter it contains, else the default (a number: it)."""
        if not isinstance(self.t, Mapping):
            return float(self.t)
        return float(next((v for k, v in self.t.items() if k != "default" and k in name), self.t["default"]))

    def check_members(self, members: Sequence[nn.Module], spec: DataSpec | None = None) -> None:
        check(
            len(members) == self.MEMBERS,
            "ensemble",
            f"{len(members)} member(s)",
            "exactly 2 members: fuse=slerp interpolates between two models (e.g. ensemble=soup5 "
            "'ensemble.seeds=[0,1]'); for more, fuse=soup_uniform or a merge such as fuse=ties",
        )
        super().check_members(members, spec)
        if isinstance(self.t, Mapping):
            names = [k for k, v in members[0].state_dict().items() if v.is_floating_point()]
            for key in self.t:
                check(
                    key == "default" or any(key in n for n in names),
                    f"fuse.t.{key}",
                    self.t[key],
                    f"a substring of a floating tensor's name, e.g. of {names[:6]}",
                )

    def _fit(self, members: list[nn.Module], x: Tensor, y: Tensor) -> None:
        first, second = (m.state_dict() for m in members)
        state, self.lerp_ = {}, []
        for k, v in first.items():
            if not v.is_floating_point():
                state[k] = v.clone()
                continue
            state[k], lerped = _slerp(self.t_for(k), v, second[k], DOT_THRESHOLD, 1e-8)
            if lerped:
                self.lerp_.append(k)
        net = copy_facts(members[0], copy.deepcopy(members[0]))
        net.load_state_dict(state)
        self.soup_ = net.eval()
        self.member_val_acc_ = [accuracy(m, x, y) for m in members]
        self.val_acc_ = accuracy(self.soup_, x, y)
        self.n_members_ = len(members)

    def stats(self) -> dict[str, float]:
        check_is_fitted(self, "soup_")
        out = {"fuse/lerp_tensors": float(len(self.lerp_))}
        return {"fuse/t": float(self.t), **out} if not isinstance(self.t, Mapping) else out

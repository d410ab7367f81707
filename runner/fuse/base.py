"""The Fusion contract, member compatibility checks and the shared output-level path.

Output-level strategies combine member probabilities through one `combine(member_probs)` call
(shape (M, N, C) -> (N, C)), so a caller holding already computed member probabilities (the
pipeline keeps every member's test probabilities) fuses them without running members again.

Strategies differ through what they declare and the methods they override, never through the
caller asking for their type: `requires` names what the members must have (checked by
`check_members`), `prepare(members)` hands over the members before they train (weight-space merges
keep their shared start), `fused_test_probs` and `val_outputs` give what output-level fusion computes
without running the fused model again, and `fuses_outputs` says whether any model, a compressed
one included, can be fused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn

from runner.batches import DataSpec, Inputs, num_samples, take, to_device
from runner.batches import collect as collect_batches
from runner.device import device_of
from runner.errors import ConfigError, check
from runner.models.adapter import check_forward, check_split
from runner.models.facts import init_id


def describe(members: Sequence[nn.Module], value: str | Callable[[nn.Module], Any]) -> dict[str, Any]:
    """`value` of each member (an attribute name, or a function of the member), keyed `<i>:<class>`."""
    read = value if callable(value) else (lambda m: getattr(m, value, None))
    return {f"{i}:{type(m).__name__}": read(m) for i, m in enumerate(members)}


def architecture(net: nn.Module) -> tuple:
    return type(net).__name__, tuple((k, tuple(v.shape)) for k, v in net.state_dict().items())


def collect(batches: Iterable) -> tuple[Inputs, Tensor]:
    """All (x, y) batches of a split concatenated (fusion fits on val, which is small)."""
    try:
        return collect_batches(batches)
    except ValueError as e:
        raise ConfigError("fuse.fit(val)", str(e), "a non-empty loader of (x, y) validation batches") from None


@torch.no_grad()
def member_probs(members: Sequence[nn.Module], x: Inputs, batch_size: int = 4096) -> Tensor:
    """Class probabilities of every member, computed on its device: shape (M, N, C), on the CPU."""
    out, n = [], num_samples(x)
    for m in members:
        m.eval()
        device = device_of(m)
        out.append(
            torch.cat(
                [
                    torch.softmax(m(to_device(take(x, slice(i, i + batch_size)), device)).double(), 1).cpu()
                    for i in range(0, n, batch_size)
                ]
            )
        )
    widths = {p.shape[1] for p in out}
    if len(widths) > 1:
        raise ConfigError(
            "ensemble.members",
            {f"{i}:{type(m).__name__}": p.shape[1] for i, (m, p) in enumerate(zip(members, out))},
            "members that output the same number of classes",
        )
    return torch.stack(out)


def check_is_fitted(fusion: Fusion, attribute: str) -> None:
    """Raise scikit-learn's NotFittedError (a ValueError and AttributeError) before `fit`."""
    if not hasattr(fusion, attribute):
        raise NotFittedError(
            f"This {type(fusion).__name__} is not fitted yet: call fit(members, val) "
            "(or fit_outputs) before predicting."
        )


class Fusion:
    """Base class of fusion strategies (scikit-learn style).

    `__init__` stores and validates parameters only; `fit(members, val)` returns self and keeps
    its fitted state in attributes ending in `_`; predicting before `fit` raises
    sklearn's NotFittedError.

    `requires`: what the members must have beyond one label set, checked by `check_members` in
    this order: "one_architecture" (state dicts of the same names and shapes), "shared_start" (one
    initial checkpoint: equal init ids, runner.models.facts), "feature_split" (features -> head on
    the data's real inputs, runner.models.adapter). `requirement` is what a refusal says is needed.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    requirement: ClassVar[str] = ""
    fuses_outputs: ClassVar[bool] = False  # combines member outputs: any models fuse, compressed ones too

    def check_members(self, members: Sequence[nn.Module], spec: DataSpec | None = None) -> None:
        """Raise ConfigError if the members cannot be fused; safe to call on untrained nets. With the
        data's `spec`, every member runs once on its real inputs (one label set, one input)."""
        check(len(members) >= 2, "ensemble", f"{len(members)} member(s)", "2 or more members to fuse")
        for i, m in enumerate(members if spec is not None else []):
            check_forward(
                m, spec.example, spec.num_classes, f"ensemble.members[{i}] ({type(m).__name__})", spec.input_spec
            )
        values = describe(members, "num_classes")
        if len({v for v in values.values() if v is not None}) > 1:
            raise ConfigError(
                "ensemble.members (num_classes)",
                values,
                "members with the same number of classes: fusion combines predictions for one input over one label set",
            )
        unknown = self.requires - set(REQUIREMENTS)
        check(not unknown, f"{type(self).__name__}.requires", sorted(unknown), list(REQUIREMENTS))
        for name, requirement in REQUIREMENTS.items():
            if name in self.requires:
                requirement(self, members, spec)

    def _check_architecture(self, members: Sequence[nn.Module], spec: DataSpec | None) -> None:
        if len({architecture(m) for m in members}) > 1:
            raise ConfigError(
                "ensemble.members (architecture)",
                {f"{i}:{type(m).__name__}": sum(p.numel() for p in m.parameters()) for i, m in enumerate(members)},
                self.requirement,
            )

    def _check_shared_start(self, members: Sequence[nn.Module], spec: DataSpec | None) -> None:
        ids = describe(members, init_id)
        if None in ids.values():
            raise ConfigError("ensemble.shared_init (member init_id)", ids, self.requirement)
        if len(set(ids.values())) > 1:
            self._refuse_starts(ids)

    def _refuse_starts(self, ids: Mapping[str, str]) -> None:
        """Members of one architecture, each with its own initial weights (`ids`)."""
        raise ConfigError("ensemble.shared_init (member init_id)", dict(ids), self.requirement)

    def _check_feature_split(self, members: Sequence[nn.Module], spec: DataSpec | None) -> None:
        for i, m in enumerate(members if spec is not None else []):  # features -> head on the real inputs
            check_split(m, spec.example, f"ensemble.members[{i}] ({type(m).__name__})")

    def prepare(self, members: Sequence[nn.Module]) -> Fusion:
        """Hand over the members before they train (after any shared pre-training): weight-space
        merges keep their shared start; other strategies need nothing then."""
        return self

    def fused_test_probs(self, member_probs: Tensor) -> Tensor | None:
        """The fused probabilities (N, C) from the members' (M, N, C), for strategies that combine
        member outputs; None: the fused model has to run."""
        return None

    def val_outputs(self) -> tuple[Tensor, Tensor] | None:
        """(fused validation probabilities, validation labels) kept from `fit`; None: the fused
        model has to run on val."""
        return None

    def fit(self, members: Sequence[nn.Module], val: Iterable[tuple[Tensor, Tensor]]) -> Fusion:
        """Fit on the validation batches `val` (never train or test)."""
        members = list(members)
        self.check_members(members)
        x, y = collect(val)
        device = device_of(members[0])  # fitted where the members are (the job's device)
        self._fit(members, to_device(x, device), y.to(device))
        return self

    def _fit(self, members: list[nn.Module], x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def predict_proba(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        return self.predict_proba(x).argmax(1)

    def as_module(self) -> nn.Module:
        """The fitted fused model as one nn.Module whose forward returns log-probabilities."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """What the fit chose, as metrics logged with the fused model (e.g. `fuse/scaling`)."""
        return {}

    def _params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._params().items())})"


REQUIREMENTS: dict[str, Callable[[Fusion, Sequence[nn.Module], DataSpec | None], None]] = {
    "one_architecture": Fusion._check_architecture,
    "shared_start": Fusion._check_shared_start,
    "feature_split": Fusion._check_feature_split,
}
MEANING = {  # what each requirement asks of the members (the docs' compatibility table shows these)
    "one_architecture": "the members are one architecture (equal parameter names and shapes)",
    "shared_start": "the members start from one set of weights (ensemble.shared_init, soup5, finetune5)",
    "feature_split": "each member splits into features -> a final Linear head (a head the adapter finds)",
}


class OutputFusion(Fusion):
    """Strategies that combine member probabilities: subclasses implement `_fit_outputs` and `_combine`."""

    fuses_outputs = True

    def fused_test_probs(self, member_probs: Tensor) -> Tensor:
        return self.combine(member_probs)

    def val_outputs(self) -> tuple[Tensor, Tensor]:
        check_is_fitted(self, "val_probs_")
        return self.combine(self.val_probs_), self.val_y_

    def _fit(self, members: list[nn.Module], x: Tensor, y: Tensor) -> None:
        self.val_probs_, self.val_y_ = member_probs(members, x), y.cpu()  # kept so no one computes them again
        self.fit_outputs(self.val_probs_, self.val_y_)  # both on the CPU (y may be on the members' GPU)
        self.members_ = members

    def fit_outputs(self, member_probs: Tensor, y: Tensor) -> OutputFusion:
        """Fit on member validation probabilities (M, N, C) and labels (N,)."""
        check(
            member_probs.dim() == 3 and member_probs.shape[1] == len(y),
            "fuse.fit_outputs",
            tuple(member_probs.shape),
            f"member probabilities of shape (M, {len(y)}, C)",
        )
        self._fit_outputs(member_probs.double(), y.long())
        self.n_members_, self.num_classes_ = member_probs.shape[0], member_probs.shape[2]
        return self

    def _fit_outputs(self, member_probs: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def combine(self, member_probs: Tensor) -> Tensor:
        """Fused probabilities (N, C) from member probabilities (M, N, C), members in `fit` order."""
        check_is_fitted(self, "n_members_")
        check(
            tuple(member_probs.shape[::2]) == (self.n_members_, self.num_classes_),
            "fuse.combine",
            tuple(member_probs.shape),
            f"shape ({self.n_members_}, N, {self.num_classes_})",
        )
        return self._combine(member_probs.double()).to(member_probs.dtype)  # computed in float64

    def _combine(self, member_probs: Tensor) -> Tensor:
        raise NotImplementedError

    def predict_proba(self, x: Tensor) -> Tensor:
        check_is_fitted(self, "members_")
        return self.combine(member_probs(self.members_, x))

    def as_module(self) -> nn.Module:
        check_is_fitted(self, "members_")
        return OutputEnsemble(self)


class OutputEnsemble(nn.Module):
    """Members as submodules (so size metrics count them) + the fitted strategy's `combine`."""

    def __init__(self, fusion: OutputFusion) -> None:
        super().__init__()
        self.members = nn.ModuleList(fusion.members_)
        self.fusion = fusion

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([torch.softmax(m(x).double(), 1) for m in self.members])
        # combined on the CPU, where the fitted weights (and a stacking meta-learner) are
        return self.fusion.combine(probs.cpu()).log().to(probs.device)


class LogSoftmaxNet(nn.Module):
    """A single fused network whose logits become log-probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.net(x).float(), 1)


def gain_over_best(fused: dict[str, float], members: Sequence[dict[str, float]]) -> dict[str, float]:
    """`gain/<metric>`: the fused model against the best single member, positive = better.

    acc and f1: fused minus the highest member value; nll and ece: the lowest member value minus fused.
    """
    gains = {}
    for name, higher_is_better in (("acc", True), ("f1", True), ("nll", False), ("ece", False)):
        key = f"test/{name}"
        if key in fused and members and all(key in m for m in members):
            values = [m[key] for m in members]
            gains[f"gain/{name}"] = fused[key] - max(values) if higher_is_better else min(values) - fused[key]
    return gains

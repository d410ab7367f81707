"""Knowledge distillation (Hinton et al. 2015): train a smaller student on the teacher's
temperature-softened probabilities plus the true labels; optionally also on the teacher's
intermediate features (FitNets, Romero et al. 2015).

Teachers: the member itself, the fused ensemble, or every member of the job at once
(`teacher: members`, see `multi_teacher_soft_loss` for how their losses combine).

With `mixup > 0` the soft targets also cover mixup interpolations of each batch (function
matching, Beyer et al. 2022): the teacher labels inputs the training set does not contain, which
is where a student learns more than the hard labels tell it. On MNIST-1D, soft targets on the
training points alone left an MLP student within noise of the same student trained alone;
with mixup an MLP-64 student gains 4-5 points (6-9 for MLP-128/256 students), and mixup
without a teacher does not (benchmarks/compression.py).

Feature distillation: forward hooks catch the output (or, with `capture: input`, the input) of
named submodules of student and teacher; a learned projection (`FeatureProjection`) maps the
student's feature onto the teacher's, and `weight * MSE` per pair is added to the logit loss.
The projections train with the student and are dropped afterwards; the hooks are removed.
The hooks, shape probe and projections live in `runner.compress.feature_taps`.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from runner.batches import DataSpec, Inputs, first_inputs, num_samples, take
from runner.compress.base import CompressContext, Step, check_epochs, finetune
from runner.compress.feature_taps import (
    CAPTURES,
    FEATURE_KEYS,
    FeaturePair,
    FeatureProjection,
    FeatureTaps,
    _modes,
    _restore,
    check_pair_shapes,
    feature_loss,
    probe_features,
)
from runner.compress.requirements import is_quantized
from runner.errors import check
from runner.models import LitClassifier
from runner.models.adapter import build_model, check_forward
from runner.models.retokenize import retokenized

TEACHERS = ("member", "ensemble", "members")
PROBE_SAMPLES = 64  # validation inputs the feature MSE is reported on (before and after training)


# --- teachers ---------------------------------------------------------------------------------


class TeacherMemo(nn.Module):
    """A frozen teacher whose output per input row is computed once and then looked up.

    A teacher in eval mode gives the same logits for the same input every epoch, so distilling for
    E epochs runs it on the training set once instead of E times; a fused ensemble (5 MiniLMs: the
    cost of every student step) is run once per job and shared by the students of all its members.
    Rows are keyed by a digest of their bytes (every tensor of dict inputs), so any order or batching
    of the same rows hits. Only for inputs the data gives (mixup's interpolations are new every
    step and go to the teacher itself: `Distill` never memoizes them) and teachers without feature
    hooks. `misses` counts the rows the teacher ran on.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.memo: dict[bytes, Tensor] = {}
        self.misses = 0

    @staticmethod
    def keys(x: Inputs) -> list[bytes]:
        parts = [x[k] for k in sorted(x)] if isinstance(x, dict) else [x]
        rows = [p.detach().reshape(len(p), -1).cpu().contiguous().numpy() for p in parts]
        digests = []
        for i in range(num_samples(x)):
            h = hashlib.blake2b(digest_size=16)
            for r in rows:
                h.update(r[i].tobytes())
            digests.append(h.digest())
        return digests

    @torch.no_grad()
    def forward(self, x: Inputs) -> Tensor:
        keys, device = self.keys(x), _device_of(x)
        missing = [i for i, k in enumerate(keys) if k not in self.memo]
        if missing:
            out = self.teacher(x if len(missing) == len(keys) else take(x, torch.tensor(missing, device=device)))
            for i, row in zip(missing, out.float().cpu()):
                self.memo[keys[i]] = row
            self.misses += len({keys[i] for i in missing})
        return torch.stack([self.memo[k] for k in keys]).to(device)


def _device_of(x: Inputs) -> torch.device:
    return next(iter(x.values())).device if isinstance(x, dict) else x.device


# --- losses -----------------------------------------------------------------------------------


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float, alpha: float
) -> Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, target).

    T^2 keeps the soft-target gradients on the scale of the hard-target ones. Teacher outputs may
    be logits or log-probabilities (an ensemble's): softmax is the same for both.
    """
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, target)


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the batch."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, 1),
            F.log_softmax(teacher_logits / temperature, 1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


def multi_teacher_soft_loss(
    student_logits: Tensor, teacher_logits: Sequence[Tensor], weights: Sequence[float], temperature: float
) -> Tensor:
    """sum_k w_k * T^2 * KL(teacher_k,T || student_T), weights summing to 1.

    Why a weighted sum of KLs rather than one KL to the weighted mean of the teachers' tempered
    probabilities: the two have the same gradient for the student (the KL sum is that KL plus
    sum_k w_k KL(p_k || mean p), which does not depend on the student), so the student is pulled to
    the same mixture; the sum's value also counts the teachers' disagreement, and each teacher's
    term can be read on its own. Unlike `teacher: ensemble` (a fusion strategy's probabilities at
    T=1, then tempered), each teacher is tempered before mixing, and no fusion strategy is needed.
    """
    return sum(
        w * soft_target_loss(student_logits, t, temperature) for t, w in zip(teacher_logits, weights, strict=True)
    )


# --- the training module ------------------------------------------------------------------------


class DistillModule(LitClassifier):
    """LitClassifier whose training loss is the distillation loss against frozen teacher(s).

    `teacher` is one module or a list (multi-teacher, mixed with `teacher_weights`, uniform when
    None). With `features`, `projections` (one FeatureProjection per pair, trained with the
    student) and a single teacher, `feature_loss` is added. Hook handles go into `hooks`, which
    the caller should empty with `remove_hooks` (done at the end of fit, and by Distill.apply
    whatever happens).
    """

    def __init__(
        self,
        net: nn.Module,
        teacher: nn.Module | Sequence[nn.Module],
        temperature: float,
        alpha: float,
        mixup: float = 0.0,
        teacher_weights: Sequence[float] | None = None,
        features: Sequence[FeaturePair] = (),
        projections: Sequence[FeatureProjection] | None = None,
        hooks: list[RemovableHandle] | None = None,
        memos: Sequence[TeacherMemo] | None = None,
        **optim: Any,
    ) -> None:
        super().__init__(net, **optim)
        teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        weights = normalized(teacher_weights, len(teachers))
        if memos is not None and len(memos) != len(teachers):
            raise ValueError(f"one memo per teacher: {len(teachers)} teachers, {len(memos)} memos")
        # each teacher's TeacherMemo (None: run it on every batch), like the teachers not submodules
        self._memos = [m for m, w in zip(memos or [None] * len(teachers), weights) if w > 0]
        # Not submodules: Lightning must neither train them, switch their mode nor save them; a teacher
        # may be the caller's member or ensemble, which has to come back untouched. Teachers of weight
        # 0 are not run at all.
        self._teachers = [t for t, w in zip(teachers, weights) if w > 0]
        self._weights = [w for w in weights if w > 0]
        self.temperature, self.alpha, self.mixup = temperature, alpha, mixup
        self._features = list(features)
        if self._features and len(teachers) != 1:  # Distill refuses this in __init__
            raise ValueError("feature distillation needs one network teacher")
        # A submodule, so Lightning moves it and configure_optimizers gives it to the optimizer; not
        # part of `net`, so the student comes back as built.
        self.projections = nn.ModuleList(projections or [])
        if len(self.projections) != len(self._features):
            raise ValueError(
                f"one projection per feature pair: {len(self._features)} pairs, {len(self.projections)} projections"
            )
        self._hooks = hooks if hooks is not None else []
        self._taps: tuple[FeatureTaps, FeatureTaps] | None = None

    def on_fit_start(self) -> None:
        for i, teacher in enumerate(self._teachers):
            device = next(iter(teacher.parameters()), torch.empty(0)).device
            if device != self.device:
                self._teachers[i] = copy.deepcopy(teacher).to(self.device)
            self._teachers[i].eval()
            if self._memos[i] is not None:  # the memo runs the teacher where the student trains
                self._memos[i].teacher = self._teachers[i]
        self.attach_hooks()

    def on_fit_end(self) -> None:
        self.remove_hooks()

    def attach_hooks(self) -> None:
        """Hooks on the student and the (single) teacher for the feature pairs (no-op without)."""
        if self._features and self._taps is None:
            captures = [p.capture for p in self._features]
            self._taps = (
                FeatureTaps(self.net, [p.student for p in self._features], captures, self._hooks),
                FeatureTaps(self._teachers[0], [p.teacher for p in self._features], captures, self._hooks),
            )

    def remove_hooks(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        self._taps = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = super().configure_optimizers()
        extra = list(self.projections.parameters())
        if extra:  # same lr, weight decay and momentum as the student's
            optimizer.add_param_group({"params": extra})
        return optimizer

    def _soft(self, student_logits: Tensor, x: Inputs, memos: Sequence[TeacherMemo | None] = ()) -> Tensor:
        """The soft term on `x`; `memos` (one per teacher, or none) answer for inputs the data gave."""
        with torch.no_grad():
            teacher_logits = [
                (m or t)(x).float() for t, m in zip(self._teachers, memos or [None] * len(self._teachers))
            ]
        return multi_teacher_soft_loss(student_logits, teacher_logits, self._weights, self.temperature)

    def loss(self, logits: Tensor, y: Tensor, x: Inputs) -> Tensor:
        # the student's hooked features are those of the forward that gave `logits`: read them first
        student_feats = list(self._taps[0].values) if self._taps else []
        soft = self._soft(logits, x, self._memos)
        teacher_feats = list(self._taps[1].values) if self._taps else []
        if self.mixup > 0:
            # The soft term averages the batch and its mixup (lam ~ Beta(mixup, mixup), a random
            # partner per sample); the hard term and the features stay on the real, labelled samples.
            lam = torch.distributions.Beta(self.mixup, self.mixup).sample((len(x),)).to(x.device)
            lam = lam.view(-1, *[1] * (x.dim() - 1))
            mixed = lam * x + (1 - lam) * x[torch.randperm(len(x), device=x.device)]
            soft = (soft + self._soft(self.net(mixed), mixed)) / 2
        total = self.alpha * soft + (1.0 - self.alpha) * F.cross_entropy(logits, y)
        if self._taps:
            total = total + feature_loss(
                student_feats, teacher_feats, self.projections, [p.weight for p in self._features]
            )
        return total


def normalized(weights: Sequence[float] | None, count: int) -> list[float]:
    """`weights` scaled to sum 1 (uniform when None)."""
    if weights is None:
        return [1.0 / count] * count
    total = float(sum(weights))
    return [float(w) / total for w in weights]


# --- the step -----------------------------------------------------------------------------------


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _feature_pairs(features: Any) -> list[FeaturePair]:
    key = "compress.steps[].features"
    if isinstance(features, (DictConfig, ListConfig)):
        features = OmegaConf.to_container(features, resolve=True)
    check(
        features is None or isinstance(features, (list, tuple)),
        key,
        features,
        "a list of {student: <module name>, teacher: <module name>, weight: float, capture: output|input}",
    )
    pairs = []
    for j, item in enumerate(features or []):
        k = f"{key}[{j}]"
        check(isinstance(item, Mapping), k, item, "{student: <module name>, teacher: <module name>, weight: float}")
        unknown = sorted(set(item) - set(FEATURE_KEYS))
        check(not unknown, f"{k}.{unknown[0] if unknown else ''}", item, f"the keys {list(FEATURE_KEYS)}")
        for side in ("student", "teacher"):
            name = item.get(side)
            check(
                isinstance(name, str) and name != "",
                f"{k}.{side}",
                name,
                f"the name of a submodule of the {side} (as in named_modules(), e.g. body.2)",
            )
        weight = item.get("weight", 1.0)
        check(_real(weight) and weight >= 0, f"{k}.weight", weight, "a float >= 0")
        capture = item.get("capture", "output")
        check(capture in CAPTURES, f"{k}.capture", capture, list(CAPTURES))
        pairs.append(FeaturePair(item["student"], item["teacher"], float(weight), capture))
    return pairs


def _teacher_weights(weights: Any, teacher: str) -> list[float] | None:
    key = "compress.steps[].teacher_weights"
    if isinstance(weights, ListConfig):
        weights = OmegaConf.to_container(weights, resolve=True)
    if weights is None:
        return None
    check(teacher == "members", key, weights, "null unless teacher: members")
    ok = isinstance(weights, (list, tuple)) and len(weights) >= 1 and all(_real(w) for w in weights)
    check(ok, key, weights, "null (uniform) or a list of numbers, one per member in member order")
    check(all(w >= 0 for w in weights), key, list(weights), "non-negative weights (one per member)")
    check(sum(weights) > 0, key, list(weights), "non-negative weights, not all zero (normalized to sum 1)")
    return [float(w) for w in weights]


class Distill(Step):
    """Replace the model by `student` (a conf/model node, or a module) trained by distillation.

    teacher=member distills the model entering this step (the trained member when the step comes
    first); teacher=ensemble distills the fused ensemble of all members (ensemble distillation);
    teacher=members distills every trained member of the job at once (`ctx.members`), each
    teacher's tempered KL weighted by `teacher_weights` (null: uniform; else one non-negative
    weight per member in member order, normalized to sum 1). With a single member, `members` is
    that member. A caller giving no `ctx.members` gets the model entering the step as the one member.
    A student given as config is built per member, under the member's seed. `mixup > 0` also
    matches the teacher on mixup interpolations of the inputs (Beta(mixup, mixup) weights; 0: off).

    `features` adds FitNets hints: a list of {student, teacher, weight, capture} (module names in
    the student and the teacher, as in `named_modules()`; `capture: input` takes the module's input,
    e.g. `head` for the features the classifier sees). They need teacher=member. After apply,
    `stats_` holds the weighted feature MSE on validation inputs before and after training.
    """

    keeps_weights = False  # the student is a new network

    def __init__(
        self,
        student: DictConfig | Mapping | nn.Module,
        teacher: str = "member",
        temperature: float = 4.0,
        alpha: float = 0.9,
        epochs: int = 20,
        lr: float | None = None,
        mixup: float = 0.0,
        teacher_weights: Sequence[float] | None = None,
        features: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        check(teacher in TEACHERS, "compress.steps[].teacher", teacher, list(TEACHERS))
        check(temperature > 0, "compress.steps[].temperature", temperature, "a float > 0")
        check(0.0 <= alpha <= 1.0, "compress.steps[].alpha", alpha, "a float in [0, 1]")
        check(mixup >= 0, "compress.steps[].mixup", mixup, "a float >= 0 (0: no mixup)")
        check_epochs("compress.steps[]", epochs, lr, "epochs")
        check(
            isinstance(student, (DictConfig, Mapping, nn.Module)),
            "compress.steps[].student",
            student,
            "a model config with _target_ (e.g. from conf/model) or an nn.Module",
        )
        if isinstance(student, Mapping) and not isinstance(student, DictConfig):
            student = OmegaConf.create(dict(student))
        weights = _teacher_weights(teacher_weights, teacher)
        pairs = _feature_pairs(features)
        check(
            not pairs or teacher == "member",
            "compress.steps[].features",
            [vars(p) for p in pairs],
            f"[] with teacher: {teacher} (feature distillation needs one network teacher: teacher: member)",
        )
        self.student, self.teacher, self.temperature, self.alpha = student, teacher, temperature, alpha
        self.epochs, self.lr, self.mixup = epochs, lr, mixup
        self.teacher_weights, self.features = weights, pairs
        self.needs_ensemble = teacher == "ensemble"
        self._shared: tuple[nn.Module, TeacherMemo] | None = None  # the ensemble and its memo

    def build_student(self, source: nn.Module | None = None) -> nn.Module:
        """The student, taking the inputs of `source` (the model entering the step): a student with a
        tokenizer of its own reads the data's token ids as texts (runner.models.retokenize)."""
        if isinstance(self.student, nn.Module):
            student = copy.deepcopy(self.student)
        else:
            student = build_model(self.student, self.key + ".student")
        return student if source is None else retokenized(student, source)

    def _feature_keys(self, side: str) -> list[str]:
        return [f"{self.key}.features[{j}].{side}" for j in range(len(self.features))]

    def _probe(self, student: nn.Module, teacher: nn.Module, x: Inputs) -> list[FeatureProjection]:
        """The projection of every feature pair, from one forward pass of each net on `x`."""
        captures = [p.capture for p in self.features]
        s = probe_features(student, x, [p.student for p in self.features], captures, self._feature_keys("student"))
        t = probe_features(teacher, x, [p.teacher for p in self.features], captures, self._feature_keys("teacher"))
        for j, pair in enumerate(self.features):
            check_pair_shapes(s[j], t[j], pair, f"{self.key}.features[{j}]")
        return [FeatureProjection(a, b) for a, b in zip(s, t)]

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        super().check(model, spec)  # (it requires nothing of the model it replaces: only of its student)
        student = self.build_student(model)
        check_forward(student, spec.example, spec.num_classes, self.key + ".student", spec.input_spec)
        check(not is_quantized(student), self.key + ".student", type(student).__name__, "a float model")
        check(
            self.mixup == 0 or spec.float_inputs,
            self.key + ".mixup",
            self.mixup,
            f"0 for inputs that cannot be interpolated ({spec.input_spec})",
        )
        if self.features:
            self._probe(student, model, spec.example)

    def check_members(self, count: int) -> None:
        """Raise ConfigError unless `teacher_weights` gives one weight per member (`count` in the job)."""
        if self.teacher == "members" and self.teacher_weights is not None:
            check(
                len(self.teacher_weights) == count,
                self.key + ".teacher_weights",
                self.teacher_weights,
                f"{count} non-negative weights, one per member in member order (the job has {count} "
                f"member{'s' if count != 1 else ''}), or null for uniform weights",
            )

    def preview(self, model: nn.Module) -> nn.Module:
        return self.build_student(model)

    def teachers(self, model: nn.Module, ctx: CompressContext) -> list[nn.Module]:
        """The teacher networks of this step for `model` (the model entering it)."""
        if self.teacher == "ensemble":
            check(
                ctx.ensemble is not None,
                self.key + ".teacher",
                self.teacher,
                "member or members (teacher: ensemble needs a fusion strategy and 2+ members)",
            )
            return [ctx.ensemble]
        if self.teacher == "members":
            members = list(ctx.members or [model])
            self.check_members(len(members))
            return members
        return [model]

    def memos(self, teachers: list[nn.Module]) -> list[TeacherMemo | None]:
        """A TeacherMemo per teacher (none with feature pairs: their hooks need the teacher's forward).
        The ensemble's is kept for the next member's student (the same fused ensemble teaches all of
        a job's students); a member's lives for one student."""
        if self.features:
            return [None] * len(teachers)
        if self.teacher == "ensemble":
            if self._shared is None or self._shared[0] is not teachers[0]:
                self._shared = (teachers[0], TeacherMemo(teachers[0]))
            return [self._shared[1]]
        return [TeacherMemo(t) for t in teachers]

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        teachers = self.teachers(model, ctx)
        student = self.build_student(model)
        hooks: list[RemovableHandle] = []
        modes = _modes(teachers)  # training puts teachers in eval mode
        kwargs: dict[str, Any] = {}
        if self.features:
            x = first_inputs(ctx.datamodule.val_dataloader(), PROBE_SAMPLES)
            projections = nn.ModuleList(self._probe(student, teachers[0], x))
            kwargs = {"features": self.features, "projections": projections, "hooks": hooks}
            before = self._feature_mse(student, teachers[0], projections, x)
        try:
            student = finetune(
                student,
                ctx,
                self.epochs,
                self.lr,
                DistillModule,
                teacher=teachers,
                temperature=self.temperature,
                alpha=self.alpha,
                mixup=self.mixup,
                teacher_weights=self.teacher_weights,
                memos=self.memos(teachers),
                **kwargs,
            )
        finally:  # a teacher may be the caller's module: it comes back as it came, without hooks
            while hooks:
                hooks.pop().remove()
            _restore(modes)
        if self.features:
            self.stats_ = {
                "distill/feature_mse_before": before,
                "distill/feature_mse_after": self._feature_mse(student, teachers[0], projections.cpu(), x),
            }
        return student

    @torch.no_grad()
    def _feature_mse(
        self, student: nn.Module, teacher: nn.Module, projections: Sequence[FeatureProjection], x: Inputs
    ) -> float:
        """The weighted feature loss of the pairs on `x`, both nets in eval mode."""
        captures = [p.capture for p in self.features]
        handles: list[RemovableHandle] = []
        modes = _modes([student, teacher])
        try:
            taps = [
                FeatureTaps(net, [getattr(p, side) for p in self.features], captures, handles)
                for net, side in ((student, "student"), (teacher, "teacher"))
            ]
            student.eval()
            teacher.eval()
            student(x)
            teacher(x)
            return float(feature_loss(taps[0].values, taps[1].values, projections, [p.weight for p in self.features]))
        finally:
            for handle in handles:
                handle.remove()
            _restore(modes)

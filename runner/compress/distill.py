"""Knowledge distillation (Hinton et al. 2015): train a smaller student on the teacher's
temperature-softened probabilities plus the true labels.

With `mixup > 0` the soft targets also cover mixup interpolations of each batch (function
matching, Beyer et al. 2022): the teacher labels inputs the training set does not contain, which
is where a student learns more than the hard labels tell it. On MNIST-1D, soft targets on the
training points alone left an MLP student within noise of the same student trained alone;
with mixup an MLP-64 student gains 4-5 points (6-9 for MLP-128/256 students), and mixup
without a teacher does not (benchmarks/compression.py).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runner.compress.base import CompressContext, Step, check_epochs, finetune
from runner.compress.quantize import is_quantized
from runner.data.batches import DataSpec
from runner.errors import check
from runner.models import LitClassifier
from runner.models.adapter import build_model, check_forward

TEACHERS = ("member", "ensemble")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, target).

    T^2 keeps the soft-target gradients on the scale of the hard-target ones. Teacher outputs may
    be logits or log-probabilities (an ensemble's): softmax is the same for both.
    """
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, target)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class DistillModule(LitClassifier):
    """LitClassifier whose training loss is the distillation loss against a frozen teacher."""

    def __init__(self, net: nn.Module, teacher: nn.Module, temperature: float, alpha: float,
                 mixup: float = 0.0, **optim: Any) -> None:
        super().__init__(net, **optim)
        # Not a submodule: Lightning must neither train it, switch its mode nor save it; the
        # teacher may be the caller's ensemble, which has to come back untouched.
        self._teacher = [teacher]
        self.temperature, self.alpha, self.mixup = temperature, alpha, mixup

    def on_fit_start(self) -> None:
        teacher = self._teacher[0]
        device = next(iter(teacher.parameters()), torch.empty(0)).device
        if device != self.device:
            self._teacher[0] = copy.deepcopy(teacher).to(self.device)
        self._teacher[0].eval()

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher[0]
        with torch.no_grad():
            teacher_logits = teacher(x).float()
        if self.mixup <= 0:
            return distillation_loss(logits, teacher_logits, y, self.temperature, self.alpha)
        # The soft term averages the batch and its mixup (lam ~ Beta(mixup, mixup), a random
        # partner per sample); the hard term stays on the real, labelled samples.
        lam = torch.distributions.Beta(self.mixup, self.mixup).sample((len(x),)).to(x.device)
        lam = lam.view(-1, *[1] * (x.dim() - 1))
        mixed = lam * x + (1 - lam) * x[torch.randperm(len(x), device=x.device)]
        with torch.no_grad():
            teacher_mixed = teacher(mixed).float()
        soft = (soft_target_loss(logits, teacher_logits, self.temperature)
                + soft_target_loss(self.net(mixed), teacher_mixed, self.temperature)) / 2
        return self.alpha * soft + (1.0 - self.alpha) * F.cross_entropy(logits, y)


class Distill(Step):
    """Replace the model by `student` (a conf/model node, or a module) trained by distillation.

    teacher=member distills the model entering this step (the trained member when the step comes
    first); teacher=ensemble distills the fused ensemble of all members (ensemble distillation).
    A student given as config is built per member, under the member's seed. `mixup > 0` also
    matches the teacher on mixup interpolations of the inputs (Beta(mixup, mixup) weights; 0: off).
    """

    def __init__(self, student: DictConfig | Mapping | nn.Module, teacher: str = "member",
                 temperature: float = 4.0, alpha: float = 0.9, epochs: int = 20, lr: float | None = None,
                 mixup: float = 0.0) -> None:
        check(teacher in TEACHERS, "compress.steps[].teacher", teacher, list(TEACHERS))
        check(temperature > 0, "compress.steps[].temperature", temperature, "a float > 0")
        check(0.0 <= alpha <= 1.0, "compress.steps[].alpha", alpha, "a float in [0, 1]")
        check(mixup >= 0, "compress.steps[].mixup", mixup, "a float >= 0 (0: no mixup)")
        check_epochs("compress.steps[]", epochs, lr, "epochs")
        check(isinstance(student, (DictConfig, Mapping, nn.Module)), "compress.steps[].student", student,
              "a model config with _target_ (e.g. from conf/model) or an nn.Module")
        if isinstance(student, Mapping) and not isinstance(student, DictConfig):
            student = OmegaConf.create(dict(student))
        self.student, self.teacher, self.temperature, self.alpha = student, teacher, temperature, alpha
        self.epochs, self.lr, self.mixup = epochs, lr, mixup
        self.needs_ensemble = teacher == "ensemble"

    def build_student(self) -> nn.Module:
        if isinstance(self.student, nn.Module):
            return copy.deepcopy(self.student)
        return build_model(self.student, self.key + ".student")

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        student = self.build_student()
        check_forward(student, spec.example, spec.num_classes, self.key + ".student", spec.input_spec)
        check(not is_quantized(student), self.key + ".student", type(student).__name__, "a float model")
        check(self.mixup == 0 or spec.float_inputs, self.key + ".mixup", self.mixup,
              f"0 for inputs that cannot be interpolated ({spec.input_spec})")

    def preview(self, model: nn.Module) -> nn.Module:
        return self.build_student()

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        if self.teacher == "ensemble":
            check(ctx.ensemble is not None, self.key + ".teacher", self.teacher,
                  "member (teacher: ensemble needs a fusion strategy and 2+ members)")
            teacher = ctx.ensemble
        else:
            teacher = model
        student = self.build_student()
        return finetune(student, ctx, self.epochs, self.lr, DistillModule, teacher=teacher,
                        temperature=self.temperature, alpha=self.alpha, mixup=self.mixup)

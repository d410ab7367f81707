"""Distillation of a causal language model into a shallower one of the same family and tokenizer.

The student is the teacher's own transformers class built from the teacher's config with fewer decoder
layers (`layers`) and, from random weights only, optionally narrower (`hidden_size`,
`intermediate_size`). `init: copy` starts it from the teacher: the token embeddings, the final norm,
the LM head and `layers` of the teacher's decoder layers, evenly spaced from the first to the last
(`copied_layers`: layer round(i * (L - 1) / (l - 1)) of the teacher's L for the student's layer i of l;
SmolLM2's 30 layers into 4: 0, 10, 19 and 29), as DistilBERT starts from every other layer of BERT.
`init: random` draws every weight fresh, from `seed`.

It then learns the teacher's next-token distributions (Hinton et al. 2015, at the level of each token
as DistilBERT, Sanh et al. 2019; MiniLLM, Gu et al. 2024, distils the same distributions with the
reverse KL, this step uses the forward one): at every real token that predicts a real next token (as
runner.models.lm_metrics counts them),

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token),

each term averaged over those positions, on the texts of the training split (their labels are not
read), with AdamW, the teacher frozen in eval mode.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runner.batches import DataSpec, split_batch
from runner.compress.base import CompressContext, Step
from runner.compress.distill import soft_target_loss
from runner.errors import TrainingDiverged, check
from runner.models.llm import CausalLM, token_inputs
from runner.progress import MemberProgress
from runner.train import fit

INITS = ("copy", "random")
KEY = "compress.steps[]"


def copied_layers(teacher_layers: int, layers: int) -> list[int]:
    """The teacher's decoder layers a student of `layers` starts from: evenly spaced, the first and the
    last included (round(i * (L - 1) / (l - 1)), halves rounded up); one layer: the first."""
    if layers == 1:
        return [0]
    step = (teacher_layers - 1) / (layers - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(layers)]


def predicting(mask: Tensor) -> Tensor:
    """(B, T-1) booleans: a real token whose next token is real too (the positions that are scored)."""
    return (mask[:, :-1] * mask[:, 1:]).bool()


def lm_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float,
    alpha: float,
) -> Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, next token), each averaged
    over the positions where a real token predicts a real token. Logits (B, T, V); `teacher_logits` may
    be None when alpha is 0. A batch without any such position gives 0 (with a gradient of 0)."""
    real = predicting(attention_mask)
    if not bool(real.any()):
        return student_logits.sum() * 0.0
    scores = student_logits[:, :-1][real].float()
    total = scores.new_zeros(())
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("the soft term (alpha > 0) needs the teacher's logits")
        total = total + alpha * soft_target_loss(scores, teacher_logits[:, :-1][real].float(), temperature)
    if alpha < 1:
        total = total + (1.0 - alpha) * F.cross_entropy(scores, input_ids[:, 1:][real])
    return total


def decoder_layers(lm: nn.Module) -> str:
    """The name of the ModuleList of `lm`'s decoder layers (`model.layers` for Llama)."""
    count = int(lm.config.num_hidden_layers)
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name
    raise ValueError(f"{type(lm).__name__} has no list of {count} decoder layers")


class DistillLMModule(pl.LightningModule):
    """Trains `net` (the student CausalLM) on `lm_distillation_loss` against a frozen `teacher`
    (not a submodule: Lightning neither trains, moves nor saves it; a copy goes to the student's
    device when it is elsewhere). Epoch means of the loss go to `train/loss` and `losses`."""

    def __init__(self, net: CausalLM, teacher: CausalLM, temperature: float, alpha: float, lr: float) -> None:
        super().__init__()
        self.net = net
        self._teacher = [teacher]
        self.temperature, self.alpha, self.lr = temperature, alpha, lr
        self._batch_losses: list[Tensor] = []
        self.losses: list[float] = []  # one per epoch

    @property
    def teacher(self) -> CausalLM:
        return self._teacher[0]

    def on_fit_start(self) -> None:
        device = next(self.teacher.parameters()).device
        if device != self.device:
            self._teacher[0] = copy.deepcopy(self.teacher).to(self.device)
        self.teacher.eval()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, mask = token_inputs(split_batch(batch)[0])
        logits = self.net(ids, mask)
        teacher_logits = None
        if self.alpha > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(ids, mask)
        loss = lm_distillation_loss(logits, teacher_logits, ids, mask, self.temperature, self.alpha)
        self._batch_losses.append(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        if not self._batch_losses:
            return
        mean = torch.stack(self._batch_losses).float().mean().cpu()
        self._batch_losses = []
        if not torch.isfinite(mean):
            raise TrainingDiverged(
                f"{KEY}.lr={self.lr}: distillation diverged, the mean train loss of epoch {self.current_epoch} is "
                f"{float(mean)}; allowed: a smaller lr"
            )
        self.losses.append(float(mean))
        self.trainer.callback_metrics["train/loss"] = mean

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr)  # torch's defaults: weight decay 0.01


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class DistillLM(Step):
    """Replace a causal LM (runner.models.CausalLM) by a shallower student of its family, distilled
    from it (see the module docstring for the student, its start and the loss).

    `layers`: the student's decoder layers (1 to the teacher's); `hidden_size` / `intermediate_size`:
    its widths (null: the teacher's; another width needs `init: random`, and a hidden size divisible
    by the attention heads); `init`: copy (the teacher's embeddings, final norm, LM head and
    `copied_layers`) or random (fresh weights drawn from `seed`); `temperature` T, `alpha` (the weight
    of the soft term; 0: the next-token cross-entropy alone, the teacher is not run), `epochs` over
    the training texts (0: the initialised student as it is), `lr` (AdamW), `batches_per_epoch`
    (null: the trainer's limit_train_batches, all by default). The student is float32 and uses the
    teacher's tokenizer. After apply, `stats_`: distill_lm/student_params, teacher_params, layers,
    teacher_layers and train_loss (the last epoch's mean loss).
    """

    requires = frozenset({"float", "causal_lm"})
    float_note = "distil before quantizing"
    keeps_weights = False  # the student is a new network

    def __init__(
        self,
        layers: int = 4,
        init: str = "copy",
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        temperature: float = 2.0,
        alpha: float = 0.5,
        epochs: int = 1,
        lr: float = 5e-4,
        batches_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        check(_int(layers) and layers >= 1, f"{KEY}.layers", layers, "an integer >= 1 (at most the teacher's layers)")
        check(init in INITS, f"{KEY}.init", init, list(INITS))
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            check(value is None or (_int(value) and value >= 1), f"{KEY}.{name}", value, "null or an integer >= 1")
        check(_real(temperature) and temperature > 0, f"{KEY}.temperature", temperature, "a float > 0")
        check(_real(alpha) and 0.0 <= alpha <= 1.0, f"{KEY}.alpha", alpha, "a float in [0, 1]")
        check(_int(epochs) and epochs >= 0, f"{KEY}.epochs", epochs, "an integer >= 0")
        check(_real(lr) and lr > 0, f"{KEY}.lr", lr, "a float > 0")
        check(
            batches_per_epoch is None or (_int(batches_per_epoch) and batches_per_epoch >= 1),
            f"{KEY}.batches_per_epoch",
            batches_per_epoch,
            "null (the trainer's limit_train_batches) or an integer >= 1",
        )
        check(_int(seed), f"{KEY}.seed", seed, "an integer")
        self.layers, self.init, self.hidden_size, self.intermediate_size = layers, init, hidden_size, intermediate_size
        self.temperature, self.alpha, self.epochs, self.lr = float(temperature), float(alpha), epochs, float(lr)
        self.batches_per_epoch, self.seed = batches_per_epoch, seed

    # --- the student --------------------------------------------------------------------------

    def student_config(self, teacher: CausalLM) -> Any:
        """The teacher's transformers config with the student's layers and widths; raises ConfigError
        naming the key that does not fit the teacher."""
        config = teacher.lm.config
        n = int(config.num_hidden_layers)
        check(self.layers <= n, f"{self.key}.layers", self.layers, f"an integer in [1, {n}] (the teacher's layers)")
        widths = {}
        for name in ("hidden_size", "intermediate_size"):
            own = getattr(config, name, None)
            wanted = getattr(self, name)
            check(
                wanted is None or own is not None,
                f"{self.key}.{name}",
                wanted,
                f"null ({type(config).__name__} has no {name})",
            )
            widths[name] = own if wanted is None else wanted
            check(
                self.init != "copy" or widths[name] == own,
                f"{self.key}.{name}",
                wanted,
                f"null or {own} with init: copy (the teacher's weights fit its own width; init: random for another)",
            )
        heads = int(config.num_attention_heads)
        check(
            widths["hidden_size"] % heads == 0,
            f"{self.key}.hidden_size",
            self.hidden_size,
            f"a multiple of the teacher's {heads} attention heads",
        )
        student = copy.deepcopy(config)
        student.num_hidden_layers = self.layers
        for name, value in widths.items():
            if value is not None:
                setattr(student, name, value)
        if widths["hidden_size"] != config.hidden_size and getattr(student, "head_dim", None) is not None:
            student.head_dim = widths["hidden_size"] // heads
        layer_types = getattr(config, "layer_types", None)  # per-layer attention kinds (sliding / full)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == n:
            student.layer_types = [layer_types[i] for i in copied_layers(n, self.layers)]
        return student

    def build_student(self, teacher: CausalLM) -> CausalLM:
        """The student, initialised (`init`), as a CausalLM with the teacher's tokenizer settings."""
        config = self.student_config(teacher)
        with torch.random.fork_rng(devices=[]):  # random: from `seed`; the global RNG is left as it was
            torch.manual_seed(self.seed)
            lm = type(teacher.lm)(config).float()
        if self.init == "copy":
            prefix = decoder_layers(teacher.lm)
            source = teacher.lm.state_dict()
            chosen = copied_layers(int(teacher.lm.config.num_hidden_layers), self.layers)
            pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.(.+)")
            state = {}
            for name in lm.state_dict():
                match = pattern.fullmatch(name)
                state[name] = source[f"{prefix}.{chosen[int(match[1])]}.{match[2]}" if match else name]
            lm.load_state_dict(state)
        lm.eval()
        return CausalLM.wrap(lm, teacher.weights, teacher.preprocessing)

    # --- the step -----------------------------------------------------------------------------

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        super().check(model, spec)  # a float causal LM
        self.student_config(model)  # the layers and widths fit the teacher

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        self.check(model, None)  # type: ignore[arg-type]  (nothing here reads the data spec)
        teacher = model
        student = self.build_student(teacher)
        module = DistillLMModule(student, teacher, self.temperature, self.alpha, self.lr)
        if self.epochs > 0:
            overrides: dict[str, Any] = {
                "max_epochs": self.epochs,
                "max_steps": -1,
                "limit_val_batches": 0,
                "steps_per_call": 1,  # one batch per step (the text data gives dict batches)
            }
            if self.batches_per_epoch is not None:
                overrides["limit_train_batches"] = self.batches_per_epoch
            was_training = teacher.training
            student.train()
            try:
                fit(
                    module,
                    ctx.datamodule,
                    ctx.trainer,
                    callbacks=[MemberProgress("CausalLM", what="distillation")],
                    **overrides,
                )
            finally:  # the teacher may be the caller's model: it comes back in the mode it came
                teacher.train(was_training)
        student = student.cpu().eval()
        self.stats_ = {
            "distill_lm/student_params": float(sum(p.numel() for p in student.parameters())),
            "distill_lm/teacher_params": float(sum(p.numel() for p in teacher.parameters())),
            "distill_lm/layers": float(self.layers),
            "distill_lm/teacher_layers": float(teacher.lm.config.num_hidden_layers),
        }
        if module.losses:
            self.stats_["distill_lm/train_loss"] = module.losses[-1]
        return student

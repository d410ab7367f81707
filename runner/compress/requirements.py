"""What a compression step needs from the model it gets.

A step declares its needs by name on its class (`Step.requires`, e.g. {"float", "fx_traceable"});
`Step.check` enforces exactly what is declared, before any training, with the checks below (in
REQUIREMENTS' order) and their refusals. What depends on a step's settings (StaticQuantize's engine,
a pruning step's `min_params`) is checked by the step itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from runner.device import INT8_MODULES
from runner.errors import ConfigError, check
from runner.models.adapter import head_module
from runner.models.llm import CausalLM

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DYNAMIC_TYPES = (nn.Linear, nn.GRU, nn.LSTM)  # what dynamic int8 quantizes
RNN_TYPES = (nn.RNNBase,)
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# torch's int8 modules, and the fake-quantized ones of quantization-aware training
_QUANTIZED_PREFIXES = (
    *INT8_MODULES,
    "torch.ao.nn.qat",
    "torch.ao.nn.intrinsic.qat",
    "torch.ao.quantization.fake_quantize",
)


def is_quantized(model: nn.Module) -> bool:
    """Whether any engine has quantized `model` (or will): one of torch's int8 or fake-quantized modules,
    torchao's int8 tensors, or a module whose class declares `int8 = True` (runner.compress.quantize's
    Int8Graph; the QuantizedPreview a quantization step previews while recipes are checked)."""
    return any(
        getattr(type(m), "int8", False) is True or type(m).__module__.startswith(_QUANTIZED_PREFIXES)
        for m in model.modules()
    ) or any(type(p).__module__.startswith("torchao") for p in model.parameters())


def prunable(model: nn.Module, min_params: int = 0) -> list[tuple[nn.Module, str]]:
    """The weight of every Linear / Conv layer (biases are too few to matter) with at least
    `min_params` weights: a tiny layer (a 1-channel input conv) is cheap to keep dense and
    pruning it cuts the whole network's input."""
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE) and m.weight.numel() >= min_params]


def body_linears(model: nn.Module, min_params: int = 0) -> list[nn.Linear]:
    """Every nn.Linear of `model` with at least `min_params` weights but its final classifier layer
    (runner.models.adapter.head_module: our nets' `head`, a declared `head:`, else the last Linear),
    in registration order. What Wanda prunes and weight-only quantization quantizes: both keep the
    head as it is (Wanda and SparseGPT prune every Linear but the LM head; GPTQ / AWQ keep it in
    16 bits), a classifier's head being a few thousand weights that every prediction goes through."""
    try:
        head = head_module(model)
    except ConfigError:  # no Linear at all
        head = None
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head and m.weight.numel() >= min_params]


def fx_error(model: nn.Module) -> str | None:
    """Why torch.fx cannot trace `model` (None when it can)."""
    try:
        torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow; Hugging Face models
        return f"{type(e).__name__}: {str(e)[:150]}"
    return None


# ---- the requirements: name -> check(step, model) --------------------------------------------


def _float(step: Any, model: nn.Module) -> None:
    check(not is_quantized(model), step.key, type(model).__name__, f"a float model ({step.float_note})")


def _prunable_layers(step: Any, model: nn.Module) -> None:
    check(bool(prunable(model)), step.key, type(model).__name__, "a model with Linear or Conv layers")


def _linear_layers(step: Any, model: nn.Module) -> None:
    check(
        bool(body_linears(model)),
        step.key,
        type(model).__name__,
        "a model with an nn.Linear layer besides its classifier head (which this step keeps as it is)",
    )


def _mostly_dense(step: Any, model: nn.Module) -> None:
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, CONV_TYPES))
    dense = sum(p.numel() for m in model.modules() if isinstance(m, DYNAMIC_TYPES) for p in m.parameters(False))
    check(
        conv <= dense,
        step.key,
        f"{type(model).__name__} ({conv} of {conv + dense} weights in Conv layers)",
        "models whose weights sit mostly in Linear/GRU/LSTM layers (dynamic quantization leaves convs "
        "in float; use runner.compress.StaticQuantize or QATQuantize for conv models)",
    )


def _dense_layers(step: Any, model: nn.Module) -> None:
    check(
        any(isinstance(m, DYNAMIC_TYPES) for m in model.modules()),
        step.key,
        type(model).__name__,
        "models with Linear, GRU or LSTM layers",
    )


def _not_recurrent(step: Any, model: nn.Module) -> None:
    check(
        not any(isinstance(m, RNN_TYPES) for m in model.modules()),
        step.key,
        type(model).__name__,
        "models without GRU/LSTM layers (recurrent layers have no static int8 kernels; "
        "use runner.compress.DynamicQuantize)",
    )


def _fx_traceable(step: Any, model: nn.Module) -> None:
    """torch.fx traces it, for torch.ao's FX int8, whose kernels (`step.backend`) this torch must have."""
    check(
        step.backend in torch.backends.quantized.supported_engines,
        step.key + ".backend",
        step.backend,
        torch.backends.quantized.supported_engines,
    )
    error = fx_error(model)
    check(
        error is None,
        step.key,
        type(model).__name__,
        f"a model torch.fx can trace for torch.ao FX quantization ({error}); {step.fx_instead}",
    )


def _causal_lm(step: Any, model: nn.Module) -> None:
    check(
        isinstance(model, CausalLM),
        step.key,
        type(model).__name__,
        "a causal language model (runner.models.CausalLM, e.g. model=smollm2_lm: next-token logits)",
    )


REQUIREMENTS: dict[str, Callable[[Any, nn.Module], None]] = {
    "float": _float,  # not quantized yet; the step's `float_note` says why
    "prunable_layers": _prunable_layers,  # Linear or Conv layers
    "linear_layers": _linear_layers,  # a Linear besides the classifier head
    "mostly_dense": _mostly_dense,  # no more weights in Conv layers than in Linear / GRU / LSTM ones
    "dense_layers": _dense_layers,  # some Linear, GRU or LSTM layer
    "not_recurrent": _not_recurrent,  # no GRU / LSTM
    "fx_traceable": _fx_traceable,  # a graph torch.fx traces; the step's `fx_instead` says what else to do
    "causal_lm": _causal_lm,  # a runner.models.CausalLM (next-token logits), not a classifier
}
MEANING = {  # what each requirement asks of the model (the docs' compatibility table shows these)
    "float": "not quantized yet (a float model)",
    "prunable_layers": "has Linear or Conv layers",
    "linear_layers": "has an nn.Linear besides its classifier head (the head is kept as it is)",
    "mostly_dense": "no more weights in Conv layers than in Linear / GRU / LSTM layers",
    "dense_layers": "has a Linear, GRU or LSTM layer",
    "not_recurrent": "no GRU or LSTM layer",
    "fx_traceable": "torch.fx traces its forward (not Hugging Face models; only for the torch_ao engine)",
    "causal_lm": "a causal language model (runner.models.CausalLM: next-token logits), not a classifier",
}


def check_requirements(step: Any, model: nn.Module, names: frozenset[str] | set[str] | None = None) -> None:
    """Raise the ConfigError of the first of `names` (default: what `step` declares in `requires`) that
    `model` does not meet."""
    names = step.requires if names is None else names
    unknown = set(names) - set(REQUIREMENTS)
    if unknown:
        raise ValueError(f"{type(step).__name__} requires {sorted(unknown)}: unknown (known: {list(REQUIREMENTS)})")
    for name, enforce in REQUIREMENTS.items():
        if name in names:
            enforce(step, model)

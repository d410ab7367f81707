"""Int8 quantization on the CPU with torch.ao.quantization.

Why torch.ao and not torchao: torch.ao is deprecated in favour of torchao, but measured here
(benchmarks/compression.py --library) torchao's int8 CPU paths without torch.compile are slower
than fp32, while torch.ao's fbgemm/x86 kernels are faster; torch.ao is also what ships inside the
installed torch (no second package pinned to a torch version).

- DynamicQuantize: int8 weights, activations quantized on the fly (Linear, GRU); no calibration.
- StaticQuantize: FX graph mode post-training quantization; observers calibrated on training
  batches, Conv+ReLU / Linear+ReLU fused, int8 kernels end to end (conv models, MLPs).
- QATQuantize: the same int8 model, but fine-tuned first with fake quantization in the graph.
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from runner.compress.base import CompressContext, Step, check_epochs, finetune
from runner.data.batches import DataSpec, first_inputs, split_batch
from runner.errors import check

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", ".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", ".*quantized tensor creation functions.*are deprecated.*")
warnings.filterwarnings("ignore", ".*reduce_range will be deprecated.*")
warnings.filterwarnings("ignore", ".*must run observer before calling calculate_qparams.*")

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")
DYNAMIC_TYPES = (nn.Linear, nn.GRU, nn.LSTM)
RNN_TYPES = (nn.RNNBase,)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_QUANTIZED_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.ao.nn.qat",
                       "torch.ao.nn.intrinsic.qat", "torch.ao.quantization.fake_quantize")


class QuantizedPreview(nn.Module):
    """Stands for the int8 version of `inner` while recipes are checked (no calibration needed)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def is_quantized(model: nn.Module) -> bool:
    return isinstance(model, QuantizedPreview) or any(
        type(m).__module__.startswith(_QUANTIZED_PREFIXES) for m in model.modules())


def _use_backend(backend: str) -> None:
    if torch.backends.quantized.engine != backend:
        torch.backends.quantized.engine = backend


def _example(ctx: CompressContext, n: int = 2) -> tuple:
    return (first_inputs(ctx.datamodule.val_dataloader(), n),)


class DynamicQuantize(Step):
    """Int8 weights for Linear and GRU/LSTM layers; activations quantized per batch at run time."""

    def __init__(self, dtype: str = "qint8") -> None:
        check(dtype in ("qint8", "float16"), "compress.steps[].dtype", dtype, ["qint8", "float16"])
        self.dtype = dtype

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        check(not is_quantized(model), self.key, type(model).__name__, "a float model (quantize once)")
        conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, CONV_TYPES))
        dense = sum(p.numel() for m in model.modules() if isinstance(m, DYNAMIC_TYPES) for p in m.parameters(False))
        check(conv <= dense, self.key, f"{type(model).__name__} ({conv} of {conv + dense} weights in Conv layers)",
              "models whose weights sit mostly in Linear/GRU/LSTM layers (dynamic quantization leaves convs "
              "in float; use runner.compress.StaticQuantize or QATQuantize for conv models)")
        check(any(isinstance(m, DYNAMIC_TYPES) for m in model.modules()), self.key, type(model).__name__,
              "models with Linear, GRU or LSTM layers")

    def preview(self, model: nn.Module) -> nn.Module:
        return QuantizedPreview(model)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        from torch.ao.quantization import quantize_dynamic

        dtype = torch.qint8 if self.dtype == "qint8" else torch.float16
        return quantize_dynamic(model.cpu().eval(), set(DYNAMIC_TYPES), dtype=dtype)


class _StaticBase(Step):
    def __init__(self, backend: str, calibration_batches: int) -> None:
        check(backend in BACKENDS, "compress.steps[].backend", backend, list(BACKENDS))
        check(isinstance(calibration_batches, int) and calibration_batches >= 1,
              "compress.steps[].calibration_batches", calibration_batches, "an integer >= 1")
        self.backend, self.calibration_batches = backend, calibration_batches

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        check(self.backend in torch.backends.quantized.supported_engines, self.key + ".backend", self.backend,
              torch.backends.quantized.supported_engines)
        check(not is_quantized(model), self.key, type(model).__name__, "a float model (quantize once)")
        check(not any(isinstance(m, RNN_TYPES) for m in model.modules()), self.key, type(model).__name__,
              "models without GRU/LSTM layers (recurrent layers have no static int8 kernels; "
              "use runner.compress.DynamicQuantize)")
        try:
            torch.fx.symbolic_trace(model)
        except Exception as e:  # data-dependent control flow cannot be traced
            check(False, self.key, type(model).__name__, f"a model that torch.fx can trace ({e})")

    def preview(self, model: nn.Module) -> nn.Module:
        return QuantizedPreview(model)

    @torch.no_grad()
    def _calibrate(self, prepared: nn.Module, ctx: CompressContext) -> None:
        for i, batch in enumerate(ctx.datamodule.train_dataloader()):
            if i >= self.calibration_batches:
                break
            prepared(split_batch(batch)[0])


class StaticQuantize(_StaticBase):
    """Post-training static int8 quantization (FX graph mode), calibrated on training batches."""

    def __init__(self, backend: str = "x86", calibration_batches: int = 10) -> None:
        super().__init__(backend, calibration_batches)

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        _use_backend(self.backend)
        prepared = prepare_fx(model.cpu().eval(), get_default_qconfig_mapping(self.backend), _example(ctx))
        self._calibrate(prepared, ctx)
        return convert_fx(prepared)


class QATQuantize(_StaticBase):
    """Quantization-aware fine-tuning: fake-quantized weights and activations in the forward pass
    (straight-through gradients) for `finetune_epochs`, then the same int8 conversion as
    StaticQuantize. Observers are frozen for the last epoch so scales stop moving."""

    def __init__(self, finetune_epochs: int = 3, lr: float | None = None, backend: str = "x86",
                 calibration_batches: int = 10) -> None:
        super().__init__(backend, calibration_batches)
        check_epochs("compress.steps[]", finetune_epochs, lr)
        self.finetune_epochs, self.lr = finetune_epochs, lr

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        from torch.ao.quantization import disable_observer, get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

        _use_backend(self.backend)
        prepared = prepare_qat_fx(copy.deepcopy(model).cpu().train(),
                                  get_default_qat_qconfig_mapping(self.backend), _example(ctx))
        self._calibrate(prepared.eval(), ctx)  # start from calibrated ranges, not the first batch's
        if self.finetune_epochs > 1:
            finetune(prepared, ctx, self.finetune_epochs - 1, self.lr)
        prepared.apply(disable_observer)
        finetune(prepared, ctx, min(self.finetune_epochs, 1), self.lr)
        return convert_fx(prepared.cpu().eval())

"""Weight-only int8 / int4 quantization with torchao's `quantize_` (activations stay float).

What the LLM literature calls weight-only quantization (GPTQ, AWQ use its storage format): each
Linear's weights are stored as small integers with float scales, dequantized on the fly by the
matmul; nothing is calibrated. torchao 0.18 on the CPU:

- bits=8: `Int8WeightOnlyConfig` (an `Int8Tensor` weight): symmetric, per output channel
  (`granularity=PerRow()`) or per group of `group_size` inputs (`PerGroup`): scale = max|w| / 127.5
  over the channel (group), q = clamp(round(w * (1 / scale)), -128, 127), w ~ q * scale. int8 values,
  one float32 scale and one int8 zero point (always 0) per channel or group. Runs anywhere torch runs
  (the CPU converts the int8 weight to float for every matmul: smaller, not faster).
- bits=4: `PrototypeInt4WeightOnlyConfig` (torchao.prototype.quantization.int4, an `Int4OpaqueTensor`
  weight) of the bfloat16 weight: asymmetric per group of `group_size` (32, 64 or 128) inputs,
  tinygemm's scheme: scale = (max - min) / 15, q = clamp(round((w - min) / scale), 0, 15),
  w ~ q * scale + min; two 4-bit values per byte, packed for aten's `_weight_int4pack_mm_for_cpu`, with
  a bfloat16 (scale, zero) pair per group. The layer (`Int4CPULinear`) multiplies in bfloat16 (its
  input cast down, its output back up, the bias added in float32): the kernel's float32 path measured
  100x slower than a float32 Linear here (384 -> 1536, 256 rows, 1 thread: 244 vs 2.5 ms; bfloat16:
  3.9 ms). CPU only (the packing is the CPU kernel's; the layer says so). torchao's stable
  `Int4WeightOnlyConfig` does not run on a CPU in 0.18: its plain and preshuffled formats need the
  mslk CUDA kernels, plain_int32 is XPU/NPU only, tile_packed_to_4d asks for CUDA.

Layers whose shapes the format cannot take stay float (torchao would skip or fail on them): an input
width that is not a multiple of `group_size`, and for int4 an output width that is not a multiple of
16 (the CPU kernel's packing). The classifier head stays float too (requirements.body_linears).
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from torch import Tensor, nn

from runner.batches import DataSpec
from runner.compress.base import CompressContext, Step
from runner.compress.quantize import _record_stats, import_torchao
from runner.compress.requirements import body_linears
from runner.errors import check

INT4_GROUP_SIZES = (32, 64, 128)  # what torchao's CPU int4 packing (Int4OpaqueTensor) accepts
INT4_OUT_MULTIPLE = 16  # aten._convert_weight_to_int4pack_for_cpu: output width divisible by 16
INT4_CPU_ONLY = "int4: its weights are packed for the CPU's int4 kernel (aten._weight_int4pack_mm_for_cpu)"


class Int4CPULinear(nn.Linear):
    """An nn.Linear whose weight is torchao's CPU-packed int4 tensor (of a bfloat16 weight): the same
    state_dict; the product in bfloat16, the output and the float32 bias added in the input's dtype;
    a class that tells runner.device to keep it on the CPU."""

    cpu_only_reason = INT4_CPU_ONLY  # runner.device.cpu_only

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class WeightOnlyQuantize(Step):
    """Int8 or int4 weights for every Linear but the classifier head; activations stay float (module
    docstring: formulas, formats, which layers stay float).

    bits: 8 or 4. group_size: the inputs that share a scale; null (bits=8 only) is one scale per output
    channel; bits=4 needs 32, 64 or 128 (torchao's CPU int4). Linear-heavy models only (convolutions
    stay float, as with DynamicQuantize). stats_: `quant/weight_bits`, `quant/quantized_layers`,
    `quant/float_layers` (Linears besides the head whose shape the format cannot take), and
    `quant/fp32_agreement` / `macs` as every quantization step.
    """

    requires = frozenset({"float", "mostly_dense", "linear_layers"})
    float_note = "quantize once"
    produces_int8 = True

    def __init__(self, bits: int = 8, group_size: int | None = None) -> None:
        check(bits in (8, 4) and isinstance(bits, int), "compress.steps[].bits", bits, [8, 4])
        if bits == 4:
            check(
                group_size in INT4_GROUP_SIZES,
                "compress.steps[].group_size",
                group_size,
                f"one of {list(INT4_GROUP_SIZES)} for bits=4 (torchao's CPU int4 packing groups its scales)",
            )
        else:
            check(
                group_size is None or (isinstance(group_size, int) and group_size >= 1),
                "compress.steps[].group_size",
                group_size,
                "null (one scale per output channel) or an integer >= 1",
            )
        self.bits, self.group_size = bits, group_size

    def fits(self, layer: nn.Linear) -> bool:
        """Whether this format can hold `layer`'s weight."""
        if self.group_size is not None and layer.in_features % self.group_size:
            return False
        return self.bits == 8 or layer.out_features % INT4_OUT_MULTIPLE == 0

    def targets(self, model: nn.Module) -> list[nn.Linear]:
        """The layers `apply` quantizes: Linears besides the head that fit the format (int4: plain
        nn.Linear only, as the layer becomes an Int4CPULinear)."""
        return [m for m in body_linears(model) if self.fits(m) and (self.bits == 8 or type(m) is nn.Linear)]

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        super().check(model, spec)
        check(
            importlib.util.find_spec("torchao") is not None,
            self.key,
            type(self).__name__,
            "an installed torchao (pip install 'torchao>=0.18,<0.19'): it quantizes the weights",
        )
        shapes = sorted({(m.out_features, m.in_features) for m in body_linears(model)})
        need = f"input width a multiple of {self.group_size}" if self.group_size else ""
        if self.bits == 4:
            need += f" and output width a multiple of {INT4_OUT_MULTIPLE}"
        check(
            bool(self.targets(model)),
            self.key + ".group_size",
            self.group_size,
            f"a group size that fits some Linear besides the head ({need}; (out, in) here: {shapes[:8]})",
        )

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        import_torchao()
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup, PerRow

        model = model.cpu().eval()
        float_model = copy.deepcopy(model)  # for the agreement stats: quantize_ works in place
        layers = self.targets(model)
        if self.bits == 8:
            granularity = PerRow() if self.group_size is None else PerGroup(self.group_size)
            config = Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
        else:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            config = PrototypeInt4WeightOnlyConfig(group_size=self.group_size, set_inductor_config=False)
            for layer in layers:  # the CPU kernel's fast path is bfloat16 (Int4CPULinear)
                layer.weight = nn.Parameter(layer.weight.detach().to(torch.bfloat16), requires_grad=False)
        chosen = {id(m) for m in layers}
        quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
        for layer in layers:
            # torchao sets extra_repr to a bound functools.partial on the instance: it does not pickle
            # (torch.save of the module, MLflow's model logging); the class's own is kept
            layer.__dict__.pop("extra_repr", None)
            if self.bits == 4:
                layer.__class__ = Int4CPULinear
        _record_stats(self, float_model, model, ctx)
        self.stats_.update(
            {
                "quant/weight_bits": float(self.bits),
                "quant/quantized_layers": float(len(layers)),
                "quant/float_layers": float(len(body_linears(model)) - len(layers)),
            }
        )
        return model


@torch.no_grad()
def dequantized(weight: Tensor) -> Tensor:
    """A Linear weight as the float tensor the layer multiplies by: a torchao Int8Tensor dequantized;
    an Int4OpaqueTensor (whose packed layout has no dequantize) read through the kernel itself, as
    linear(I, W)^T on identity inputs, in float32; any other tensor as it is. For merging compressed
    models."""
    if type(weight).__name__ == "Int4OpaqueTensor":
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        return nn.functional.linear(eye, weight).T.float().contiguous()
    if hasattr(weight, "dequantize") and type(weight).__module__.startswith("torchao"):
        return weight.dequantize()
    return weight

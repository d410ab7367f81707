"""Int8 quantization on the CPU, one step per method and an `engine` per library.

Engines (benchmarks/quantization.py measures them side by side; the numbers and the choice of
`engine: auto` are in DynamicQuantize's and StaticQuantize's docstrings):

- torch_ao: torch.ao.quantization, inside torch (deprecated in favour of torchao, still shipped):
  quantize_dynamic, and FX graph mode static quantization with fbgemm/x86 kernels.
- pt2e: torchao's PT2E flow: torch.export, X86InductorQuantizer (per-channel int8 weights, uint8
  activations, conv+bn folded, conv+add+relu fused), calibration, convert_pt2e, then lowered to
  oneDNN's int8 conv/linear kernels without torch.compile (`Int8Graph`).

Measured and not kept: torchao's `quantize_(model, Int8DynamicActivationInt8WeightConfig())`
(slower than fp32 eager on every model without torch.compile; compiled, never faster than the
better of torch_ao and fp32 + torch.compile) and torch.compile of int8 models (seconds of
compile per batch size for 1.1-1.8x over `pt2e`).

torchao (a dependency, for pt2e) is imported inside the functions that use it: it adds about a
second to an import of the runner that most jobs do not need.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (quantized_decomposed ops: an Int8Graph unpickles with them)
from torch import nn

from runner.batches import DataSpec, Inputs, first_inputs, num_samples, split_batch, take, to_device
from runner.compress.base import CompressContext, Step, check_epochs, finetune
from runner.compress.requirements import CONV_TYPES, DYNAMIC_TYPES, check_requirements, fx_error
from runner.device import INT8_CPU_ONLY
from runner.errors import check
from runner.measure import count_macs

log = logging.getLogger(__name__)

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")
DYNAMIC_ENGINES = ("auto", "torch_ao")
STATIC_ENGINES = ("auto", "torch_ao", "pt2e")
AGREEMENT_SAMPLES = 256  # validation inputs behind quant/fp32_agreement


class Int8Graph(nn.Module):
    """A PT2E int8 model run by oneDNN's int8 kernels in eager mode (no torch.compile).

    `reference` is convert_pt2e's graph: int8 weights (frozen parameters), per-channel scales and
    zero points (buffers), quantize/dequantize nodes around float ops. It is what state_dict,
    deepcopy and pickling see. The lowered graph that runs (oneDNN-packed weights, which cannot be
    copied or saved) is built from it on the first forward after a copy or a load.
    """

    int8 = True  # runner.compress.requirements.is_quantized
    cpu_only_reason = INT8_CPU_ONLY  # runner.device: oneDNN's int8 kernels

    def __init__(self, reference: torch.fx.GraphModule, example: Inputs | None = None) -> None:
        super().__init__()
        for name, tensor in list(reference.named_buffers()):
            owner_name, _, attr = name.rpartition(".")
            owner = reference.get_submodule(owner_name)
            if tensor.dtype == torch.int8:  # the weights: parameters() and size_metrics count them
                del owner._buffers[attr]
                owner.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
        self.reference = reference
        object.__setattr__(self, "_lowered", None if example is None else _lower_x86(reference, example))

    def forward(self, x: Inputs) -> torch.Tensor:
        if self._lowered is None:
            # the export needs a batch of 2+ to keep the batch dimension dynamic
            object.__setattr__(self, "_lowered", _lower_x86(self.reference, _at_least_two(x)))
        return self._lowered(x)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lowered": None}

    def for_export(self) -> nn.Module:
        """What runner.export traces in its place: the quantize/dequantize reference graph, which ONNX
        writes as QuantizeLinear/DequantizeLinear (the lowered graph's oneDNN ops have no ONNX form)."""
        return copy.deepcopy(self.reference).cpu().eval()


def import_torchao() -> Any:
    """torchao, imported without the warnings a CPU build logs (its CUDA kernels fail to load)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return torchao


def _check_torchao(key: str, engine: str) -> None:
    check(
        importlib.util.find_spec("torchao") is not None,
        key,
        engine,
        "an installed torchao (pip install 'torchao>=0.18,<0.19') or engine torch_ao",
    )


def _use_backend(backend: str) -> None:
    if torch.backends.quantized.engine != backend:
        torch.backends.quantized.engine = backend


def _example(ctx: CompressContext, n: int = 2) -> tuple:
    return (first_inputs(ctx.datamodule.val_dataloader(), n),)


def _at_least_two(x: Inputs) -> Inputs:
    return x if num_samples(x) >= 2 else take(x, [0, 0])


def _dynamic_batch(x: Inputs) -> Any:
    from torch.export import Dim

    return {k: {0: Dim.DYNAMIC} for k in x} if isinstance(x, dict) else {0: Dim.DYNAMIC}


@torch.no_grad()
def _record_stats(step: Step, float_model: nn.Module, quantized: nn.Module, ctx: CompressContext) -> None:
    """MACs per sample of the float model (int8 kernels are not counted by FlopCounterMode) and
    the fraction of validation inputs whose argmax the int8 model keeps."""
    x = first_inputs(ctx.datamodule.val_dataloader(), AGREEMENT_SAMPLES)
    same = quantized(x).argmax(1) == float_model.eval()(x).argmax(1)
    # quantization (calibration, QAT epochs, conversion) runs in fp32 whatever trainer.precision is
    step.stats_ = {"quant/fp32_agreement": float(same.double().mean()), "quant/precision_bits": 32.0}
    macs = count_macs(float_model, take(x, slice(0, 1)))
    if macs is not None:
        step.stats_["macs"] = macs


# ---- dynamic int8: engines -------------------------------------------------------------------


def dynamic_torch_ao(model: nn.Module, dtype: str = "qint8") -> nn.Module:
    """torch.ao's quantize_dynamic of every Linear / GRU / LSTM (fbgemm kernels, eager)."""
    from torch.ao.quantization import quantize_dynamic

    qdtype = torch.qint8 if dtype == "qint8" else torch.float16
    return quantize_dynamic(model.eval(), set(DYNAMIC_TYPES), dtype=qdtype)  # a copy (inplace=False)


# ---- static int8: engines --------------------------------------------------------------------


def static_torch_ao(
    model: nn.Module, example: Inputs, calibrate: Callable[[nn.Module], None], backend: str = "x86"
) -> nn.Module:
    """torch.ao FX graph mode: prepare_fx (observers, Conv/Linear+ReLU fused), calibrate, convert_fx."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _use_backend(backend)
    prepared = prepare_fx(copy.deepcopy(model).cpu().eval(), get_default_qconfig_mapping(backend), (example,))
    calibrate(prepared)
    return picklable(convert_fx(prepared))


def picklable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the string type annotations FX copies from a forward written under `from __future__ import
    annotations` (`x: "torch.Tensor"`): pickling the GraphModule (torch.save, MLflow model logging)
    turns its globals into imports and cannot import a string."""
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type, changed = None, True
    if changed:
        gm.recompile()
    return gm


def pt2e_reference(model: nn.Module, example: Inputs, calibrate: Callable[[nn.Module], None]) -> torch.fx.GraphModule:
    """torchao PT2E: export (dynamic batch), X86InductorQuantizer, calibrate, convert_pt2e; the
    float weights the int8 ones replaced are dropped."""
    import_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    exported = torch.export.export(
        copy.deepcopy(model).cpu().eval(), (_at_least_two(example),), dynamic_shapes=(_dynamic_batch(example),)
    ).module()
    _one_partition_per_call(exported)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    calibrate(prepared)
    return _plain_graph_module(convert_pt2e(prepared))


def static_pt2e(model: nn.Module, example: Inputs, calibrate: Callable[[nn.Module], None]) -> Int8Graph:
    return Int8Graph(pt2e_reference(model, example, calibrate), example)


def _one_partition_per_call(gm: torch.fx.GraphModule) -> None:
    """Give each call of a module its own source partition.

    The quantizer groups nodes by the module they came from; a module called twice (ResNet's
    BasicBlock applies one ReLU after both its convs) becomes one partition with two outputs,
    which X86InductorQuantizer rejects. torch.export marks the second call's stack key `name@1`.
    """
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        key, (fqn, cls) = list(stack.items())[-1]
        if "@" in key:
            node.meta["nn_module_stack"] = {**stack, key: (f"{fqn}@{key.rsplit('@', 1)[1]}", cls)}


def _plain_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph as a plain GraphModule, holding only the tensors it reads.

    An exported module carries an input-shape guard submodule and train()/eval() overrides that
    raise; neither pickles. The float weights the int8 ones replaced stay behind as unused
    attributes: dropped, so state_dict and size metrics see the int8 model only.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.graph._tracer_cls = None  # export's tracer cannot rebuild the graph from its code on load; fx's can
    return torch.fx.GraphModule(gm, gm.graph)


def _lower_x86(reference: torch.fx.GraphModule, example: Inputs) -> torch.fx.GraphModule:
    """torchao's `lower_pt2e_quantized_to_x86` with a dynamic batch dimension.

    The same passes: re-export (non-strict: the graph is aten ops already) with CIA
    decompositions, aten.t -> permute, then Inductor's
    freezing passes replace quantize/dequantize + conv/linear (+ relu / add) patterns by oneDNN
    int8 ops with prepacked weights. torchao's version specialises the graph to the example's batch
    size, and leaves `view` nodes that fail on the channels-last outputs of oneDNN convs (a flatten
    after a pool); they become `reshape`. Private torch APIs: a test (tests/unit/test_quantize.py) runs
    this on LeNet-5 and ResNet-20 so a torch change shows there.
    """
    from torch._export.utils import _is_cia_op
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    aten = torch.ops.aten
    example = _at_least_two(example)
    decompositions = {k: v for k, v in torch.export.default_decompositions().items() if _is_cia_op(k)}
    gm = (
        torch.export.export(reference, (example,), dynamic_shapes=(_dynamic_batch(example),), strict=False)
        .run_decompositions(decompositions)
        .module()
    )
    for node in list(gm.graph.nodes):
        if node.target == aten.t.default:
            with gm.graph.inserting_before(node):
                permuted = gm.graph.call_function(aten.permute.default, args=(node.args[0], [1, 0]))
            node.replace_all_uses_with(permuted)
            gm.graph.erase_node(node)
    gm.recompile()
    with torch.no_grad():
        freezing_passes(gm, (example,))
        constant_fold(gm)
    for node in gm.graph.nodes:
        if node.target == aten.view.default:
            node.target = aten.reshape.default
    gm.recompile()
    return gm


# ---- steps -----------------------------------------------------------------------------------


class DynamicQuantize(Step):
    """Int8 weights for Linear (and GRU/LSTM) layers; activations quantized per batch at run time.

    Any model whose weights sit mostly in Linear/GRU/LSTM layers: MLPs, LeNet-300-100, LeNet-5
    (its 400k-weight Linear), transformers (vit_tiny, bert_tiny: attention and MLP Linears;
    embeddings, LayerNorms and a ViT's patch conv stay float). Conv-dominated models are refused
    (use StaticQuantize).

    engine: `torch_ao` (quantize_dynamic, eager fbgemm kernels); `auto` = torch_ao. Measured with
    `.venv/bin/python benchmarks/quantization.py` (2-core Xeon with AMX, 1 thread, load ~3 from
    other jobs): ms per batch of 64, speedup over fp32 eager, serialized KB fp32 -> torch_ao:

        model       fp32   torch_ao       torchao eager   torchao+compile  fp32+compile  KB
        lenet300    0.241  0.135  1.79x   0.667  0.36x    0.205  1.17x     0.276  0.87x  1044 -> 266
        mlp         0.100  0.101  0.99x   0.606  0.16x    0.164  0.61x     0.118  0.85x   353 -> 93
        lenet5      6.75   6.60   1.02x   7.20   0.94x    2.77   2.43x     2.65   2.54x  1687 -> 502
        vit_tiny    8.14   8.70   0.94x   17.5   0.47x    7.65   1.06x     6.89   1.18x   296 -> 112
        bert_tiny   2.59   3.11   0.83x   7.54   0.34x    2.38   1.09x     1.84   1.41x  2299 -> 2106

    torchao is slower than fp32 eager everywhere without torch.compile and, compiled, never beats
    the better of torch_ao eager and fp32 + compile, so it is not an engine here (torchao's
    weight-only int8 / int4 are WeightOnlyQuantize, runner.compress.weight_only). Argmax agreement with fp32 on
    960 test inputs: 0.990 (vit_tiny) to 0.999. On models this small (hidden 64-300) dynamic int8
    is a size step (3.9x on Linear weights), not a speed step; bert_tiny's size is its float
    token embeddings.
    """

    requires = frozenset({"float", "mostly_dense", "dense_layers"})
    float_note = "quantize once"
    produces_int8 = True

    def __init__(self, dtype: str = "qint8", engine: str = "auto") -> None:
        check(dtype in ("qint8", "float16"), "compress.steps[].dtype", dtype, ["qint8", "float16"])
        check(engine in DYNAMIC_ENGINES, "compress.steps[].engine", engine, list(DYNAMIC_ENGINES))
        self.dtype, self.engine = dtype, engine

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        model = model.cpu().eval()
        out = dynamic_torch_ao(model, self.dtype)
        _record_stats(self, model, out, ctx)
        return out


class _StaticBase(Step):
    requires = frozenset({"float", "not_recurrent"})
    float_note = "quantize once"
    produces_int8 = True
    fx_instead = ""  # what to do instead, in the refusal of a model torch.fx cannot trace

    def __init__(self, backend: str, calibration_batches: int) -> None:
        check(backend in BACKENDS, "compress.steps[].backend", backend, list(BACKENDS))
        check(
            isinstance(calibration_batches, int) and calibration_batches >= 1,
            "compress.steps[].calibration_batches",
            calibration_batches,
            "an integer >= 1",
        )
        self.backend, self.calibration_batches = backend, calibration_batches

    @torch.no_grad()
    def _calibrate(self, prepared: nn.Module, ctx: CompressContext) -> None:
        for i, batch in enumerate(ctx.datamodule.train_dataloader()):
            if i >= self.calibration_batches:
                break
            prepared(to_device(split_batch(batch)[0], "cpu"))  # int8 calibration runs on the CPU


class StaticQuantize(_StaticBase):
    """Post-training static int8 quantization (weights and activations), calibrated on
    `calibration_batches` training batches. CNNs (Conv1d/Conv2d, BatchNorm, residual adds) and MLPs.

    engine:
    - `torch_ao`: FX graph mode (fbgemm/x86 kernels, `backend` picks them); models torch.fx traces.
    - `pt2e`: torchao's PT2E + X86InductorQuantizer lowered to oneDNN int8 kernels (`Int8Graph`);
      models torch.export captures with a dynamic batch (also Hugging Face transformers, though
      slower than their fp32 there). Needs torchao.
    - `auto`: pt2e for convolutional models torch.fx can trace (LeNet-5, ResNet-20, CNN1D),
      torch_ao for the others (MLPs; models torch.fx cannot trace, i.e. Hugging Face ones, are then
      refused: pt2e ran them at half their fp32 speed; use DynamicQuantize).

    Measured with `.venv/bin/python benchmarks/quantization.py` (2-core Xeon with AMX, 1 thread,
    load ~3 from other jobs): ms at batch 1 / batch 64, speedup over fp32 eager at 64, argmax
    agreement with fp32 on 960 mnist5k test digits:

        model     fp32          torch_ao FX                 pt2e                        pt2e + compile
        cnn1d     0.083/2.23    0.148/1.74  1.28x  0.989    0.376/1.27  1.76x  1.000
        lenet5    0.365/6.75    0.287/2.95  2.29x  0.997    0.479/2.93  2.31x  0.998    0.281/1.64  4.11x
        resnet20  1.59/35.6     1.02/11.7   3.03x  0.988    1.53/5.52   6.45x  0.997    1.17/4.91   7.25x
        lenet300  0.037/0.241   0.065/0.118 2.05x  0.994    0.182/0.318 0.76x  1.000
        mlp       0.029/0.100   0.062/0.086 1.16x  0.995    0.167/0.281 0.35x  0.997
        vit_tiny  0.69/8.14     (not traceable)             1.81/14.9   0.55x  0.979

    At batch 256 (the pipeline's latency batch): resnet20 4.09x (torch_ao) vs 10.14x (pt2e), lenet5
    2.51x both, cnn1d 1.40x vs 1.74x. pt2e's uint8 activations agree better with fp32 than
    torch_ao's 7-bit ones. torch_ao is faster at batch 1 (one-sample serving: set it). torch.compile
    on top of pt2e adds 1.1-1.8x at batch 64 for 3-6 s of compile per batch size, paid again for
    every batch size a job evaluates, so no step compiles.
    """

    fx_instead = "use runner.compress.DynamicQuantize for Linear-heavy models (transformers), or engine pt2e"

    def __init__(self, backend: str = "x86", calibration_batches: int = 10, engine: str = "auto") -> None:
        super().__init__(backend, calibration_batches)
        check(engine in STATIC_ENGINES, "compress.steps[].engine", engine, list(STATIC_ENGINES))
        self.engine = engine

    def engine_for(self, model: nn.Module) -> str:
        """The engine `apply` uses on `model` (`auto` resolved)."""
        if self.engine != "auto":
            return self.engine
        conv = any(isinstance(m, CONV_TYPES) for m in model.modules())
        return "pt2e" if conv and fx_error(model) is None else "torch_ao"

    def check(self, model: nn.Module, spec: DataSpec) -> None:
        super().check(model, spec)
        if self.engine_for(model) == "torch_ao":  # fx_traceable, for this engine only
            check_requirements(self, model, {"fx_traceable"})
            return
        _check_torchao(self.key + ".engine", self.engine)
        try:
            torch.export.export(
                copy.deepcopy(model).cpu().eval(),
                (_at_least_two(spec.example),),
                dynamic_shapes=(_dynamic_batch(spec.example),),
            )
        except Exception as e:
            check(
                False,
                self.key,
                type(model).__name__,
                f"a model torch.export can capture with a dynamic batch for engine pt2e "
                f"({type(e).__name__}: {str(e)[:150]}); try engine torch_ao",
            )

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        model = model.cpu().eval()
        example, engine = _example(ctx)[0], self.engine_for(model)
        calibrate = lambda prepared: self._calibrate(prepared, ctx)  # noqa: E731
        log.info("%s: static int8 with engine %s", self.key, engine)
        if engine == "pt2e":
            out: nn.Module = static_pt2e(model, example, calibrate)
        else:
            out = static_torch_ao(model, example, calibrate, self.backend)
        _record_stats(self, model, out, ctx)
        return out


class QATQuantize(_StaticBase):
    """Quantization-aware fine-tuning: fake-quantized weights and activations in the forward pass
    (straight-through gradients) for `finetune_epochs`, then the same int8 conversion as
    StaticQuantize's torch_ao engine. Observers are frozen for the last epoch so scales stop moving."""

    requires = _StaticBase.requires | {"fx_traceable"}
    fx_instead = "for transformers use runner.compress.DynamicQuantize"

    def __init__(
        self, finetune_epochs: int = 3, lr: float | None = None, backend: str = "x86", calibration_batches: int = 10
    ) -> None:
        super().__init__(backend, calibration_batches)
        check_epochs("compress.steps[]", finetune_epochs, lr)
        self.finetune_epochs, self.lr = finetune_epochs, lr

    def apply(self, model: nn.Module, ctx: CompressContext) -> nn.Module:
        from torch.ao.quantization import disable_observer, get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

        float_model = model.cpu().eval()
        _use_backend(self.backend)
        prepared = prepare_qat_fx(
            copy.deepcopy(model).cpu().train(), get_default_qat_qconfig_mapping(self.backend), _example(ctx)
        )
        self._calibrate(prepared.eval(), ctx)  # start from calibrated ranges, not the first batch's
        # fake quantization observes fp32 tensors: under bf16/16-mixed autocast its observers would see
        # half-precision values (and torch.ao raises); the QAT epochs run in fp32 whatever trainer.precision says
        fp32 = dataclasses.replace(ctx, trainer={**dict(ctx.trainer), "precision": "32-true"})
        if self.finetune_epochs > 1:
            finetune(prepared, fp32, self.finetune_epochs - 1, self.lr)
        prepared.apply(disable_observer)
        finetune(prepared, fp32, min(self.finetune_epochs, 1), self.lr)
        out = picklable(convert_fx(prepared.cpu().eval()))
        _record_stats(self, float_model, out, ctx)
        return out


# ---- shipping FX int8 graphs ----------------------------------------------------------------


class ScriptBox(nn.Module):
    """An FX graph as TorchScript that pickles as TorchScript bytes. torch.ao FX int8 convs
    (ConvReLU1d, ...) pickle inside a GraphModule but do not unpickle (torch 2.13 re-traces the graph
    before their state is restored); the scripted graph computes the same thing and reloads."""

    cpu_only_reason = INT8_CPU_ONLY  # runner.device: it boxes torch.ao's int8 graphs

    def __init__(self, scripted: Any) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, x: Any) -> Any:
        return self.scripted(x)

    def __reduce_ex__(self, protocol: int) -> tuple:
        buffer = io.BytesIO()
        torch.jit.save(self.scripted, buffer)
        return _unbox, (buffer.getvalue(),)


def _unbox(data: bytes) -> ScriptBox:
    return ScriptBox(torch.jit.load(io.BytesIO(data), map_location="cpu")).eval()


def reloads(data: bytes) -> bool:
    """Whether torch.save'd bytes load back (torch.load, on the CPU)."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001  (whatever breaks unpickling)
        return False
    return True


def boxed_graphs(model: Any) -> Any:
    """A copy of `model` whose FX graphs that do not reload are ScriptBoxes (the model itself, or
    e.g. the int8 members of a fused ensemble)."""

    def broken(gm: Any) -> bool:
        buffer = io.BytesIO()
        torch.save(gm, buffer)
        return not reloads(buffer.getvalue())

    if isinstance(model, torch.fx.GraphModule):
        return ScriptBox(torch.jit.script(model)).eval() if broken(model) else model
    # a deep copy in which every reference to a broken graph (the ensemble's submodule, the fusion
    # strategy's list of members) is its box
    boxes = {
        id(m): ScriptBox(torch.jit.script(m)).eval()
        for m in model.modules()
        if isinstance(m, torch.fx.GraphModule) and broken(m)
    }
    return copy.deepcopy(model, memo=dict(boxes))


def shippable(model: nn.Module) -> nn.Module:
    """`model` as it can be pickled and loaded back (what the pipeline's recorder logs): the model
    itself, or a copy whose torch.ao FX int8 graphs that would not unpickle are ScriptBoxes."""
    if not any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):
        return model
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return model if reloads(buffer.getvalue()) else boxed_graphs(model)

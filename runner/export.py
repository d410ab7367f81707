"""Export a model to ONNX (or torch.export where ONNX cannot express it) and check the export.

`export_model(model, example)` tries, in order:
1. `torch.export.export` with a dynamic batch dimension, then `torch.onnx.export` of that program
   (the dynamo exporter, onnxscript) -> an ONNX model any ONNX runtime runs;
2. when only the ONNX conversion fails: the torch.export program itself (`torch.export.save`, .pt2);
3. when torch.export fails too: nothing, and the reason in one line.

A module that says what to trace in its place (`for_export()`) is exported as that: a static int8 CNN
(runner.compress.quantize.Int8Graph) as its PT2E reference graph, the quantize/dequantize form ONNX
writes as QuantizeLinear/DequantizeLinear, so ONNX Runtime runs it in int8. torch.ao's quantized modules (quant_dynamic, FX static int8 of MLPs) hold packed int8 weights
that torch.export cannot trace: they are not exported, and the reason says so.

`OrtModel` wraps an ONNX Runtime CPU session as an nn.Module without parameters, so the runner's own
`predict_proba` and `latency_stats` measure it exactly as they measure the PyTorch model.
`python -m runner.export model=<models:/ URI or child run id> output=<file.onnx>` exports a model a
job logged.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.batches import Inputs, num_samples, take
from runner.device import INT8_MODULES
from runner.evaluate import predict_proba
from runner.measure import latency_stats
from runner.models.zoo import replace_module
from runner.quiet import quiet_libraries
from runner.serve import load

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torch.export", "none")
SUFFIX = {"onnx": ".onnx", "torch.export": ".pt2"}


@dataclass
class Exported:
    """What an export made: `format` (onnx | torch.export | none), the file's bytes, why ONNX (or
    anything) could not be made, and the seconds it took."""

    format: str
    data: bytes | None
    reason: str | None
    seconds: float

    @property
    def suffix(self) -> str:
        return SUFFIX.get(self.format, "")


def _has_stand_in(module: nn.Module) -> bool:
    """Whether `module` declares what torch.export should trace in its place (a `for_export()` method)."""
    return callable(getattr(type(module), "for_export", None))


def exportable(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` to trace: every module that declares a stand-in (`for_export()`, e.g. an
    Int8Graph's quantize/dequantize reference graph), the model itself or the members of a fused int8
    ensemble, replaced by it."""
    if _has_stand_in(model):
        return model.for_export().cpu().eval()
    subject = copy.deepcopy(model).cpu().eval()
    for name in [n for n, m in subject.named_modules(remove_duplicate=False) if n and _has_stand_in(m)]:
        replace_module(subject, name, subject.get_submodule(name).for_export().cpu().eval())
    return subject


def _torch_ao_quantized(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith(INT8_MODULES)})


def _summary(error: BaseException) -> str:
    """One line: torch's exporters put the cause under '## Exception summary'."""
    text = str(error)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("(Refer")]
    return f"{type(error).__name__}: {' '.join(lines)[:400]}"


def _batch_dims(x: Inputs) -> tuple:
    batch = torch.export.Dim("batch")
    return ({k: {0: batch} for k in x},) if isinstance(x, dict) else ({0: batch},)


def _on_cpu(x: Inputs) -> Inputs:
    return {k: v.cpu() for k, v in x.items()} if isinstance(x, dict) else x.cpu()


def export_model(model: nn.Module, example: Inputs) -> Exported:
    """ONNX bytes, else torch.export .pt2 bytes, else the reason; the batch dimension stays dynamic.

    `example`: a batch of real inputs (two or more samples: a batch of one specializes the size).
    The model is copied to the CPU; the original is not touched.
    """
    start = time.perf_counter()
    quantized = _torch_ao_quantized(model)
    if quantized:
        return Exported(
            "none",
            None,
            f"torch.ao quantized modules ({', '.join(quantized)}) hold packed int8 "
            "weights that torch.export cannot trace, so neither ONNX nor torch.export can express "
            "them; export the float model and quantize it with onnxruntime.quantization",
            time.perf_counter() - start,
        )
    subject = exportable(model)
    x = _on_cpu(example)
    x = x if num_samples(x) >= 2 else take(x, [0, 0])  # a batch of one would fix the batch size to 1
    try:
        with torch.no_grad():
            program = torch.export.export(subject, (x,), dynamic_shapes=_batch_dims(x))
    except Exception as e:  # noqa: BLE001  (torch.export raises many types; the reason is what matters)
        hint = (
            "the forward leaves torch (numpy or scikit-learn code, e.g. stacking's meta-learner), which "
            "no graph can hold; "
            if "numpy" in str(e)
            else ""
        )
        return Exported("none", None, f"torch.export: {hint}{_summary(e)}", time.perf_counter() - start)
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
        return Exported("onnx", onnx_program.model_proto.SerializeToString(), None, time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
        reason = f"ONNX: {_summary(e)}"
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return Exported("torch.export", buffer.getvalue(), reason, time.perf_counter() - start)


# loggers of the ONNX exporter that report every pass (INFO) and every op library it skips (WARNING)
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx prints progress lines on stdout and its libraries log each pass: keep them out of
    the job's log (a failure still raises, and its reason is logged by the caller)."""
    levels = {name: logging.getLogger(name).level for name in EXPORTER_LOGGERS}
    for name in EXPORTER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class OrtModel(nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU, called like the module it was exported from.

    `threads` fixes the session's intra-op threads (one inter-op thread), as eval.latency_threads
    fixes torch's. Inputs are matched to the graph's inputs by name: a dict input's keys end its
    flattened names (`x_input_ids`), a tensor is the only input. Returns the first output as a tensor.
    """

    def __init__(self, onnx_bytes: bytes, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feeds(self, x: Inputs) -> dict[str, Any]:
        if not isinstance(x, dict):
            return {self.input_names[0]: x.detach().cpu().numpy()}
        feeds = {}
        for name in self.input_names:
            keys = [k for k in x if name == k or name.endswith(f"_{k}")]
            if not keys:
                raise KeyError(f"ONNX input {name!r} matches none of the input keys {list(x)}")
            feeds[name] = x[max(keys, key=len)].detach().cpu().numpy()
        return feeds

    def forward(self, x: Inputs) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self.feeds(x))[0])


def load_exported(data: bytes, fmt: str, threads: int | None = None) -> nn.Module:
    """The exported model, callable: an OrtModel for ONNX, the program's module for torch.export."""
    if fmt == "onnx":
        return OrtModel(data, threads)
    if fmt == "torch.export":
        return torch.export.load(io.BytesIO(data)).module()
    raise ValueError(f"format {fmt!r}: nothing to load (allowed: onnx, torch.export)")


def check_export(
    model: nn.Module,
    exported: Exported,
    loader: Any,
    probs: torch.Tensor,
    latency_x: Inputs,
    latency: dict[str, float],
    latency_kwargs: dict[str, Any],
) -> dict[str, float]:
    """The exported model on the test split beside the PyTorch one: `export/agreement` (share of equal
    argmax), `export/max_abs_diff` (of the probabilities), `export/acc`, its latency on the same batch
    measured the same way (`export/latency_ms`, quartiles) and `export/speedup` = PyTorch median /
    exported median; `export/seconds` and `export/bytes`. Nothing but `export/seconds` when not exported.
    """
    metrics = {"export/seconds": exported.seconds}
    if exported.data is None:
        return metrics
    runnable = load_exported(exported.data, exported.format, latency_kwargs.get("threads"))
    ported, targets = predict_proba(runnable, loader)
    stats = latency_stats(runnable, _on_cpu(latency_x), **latency_kwargs)
    metrics.update(
        {
            "export/bytes": float(len(exported.data)),
            "export/agreement": float((ported.argmax(1) == probs.argmax(1)).double().mean()),
            "export/max_abs_diff": float((ported - probs).abs().max()),
            "export/acc": float((ported.argmax(1) == targets).double().mean()),
            "export/latency_ms": stats.median_ms,
            "export/latency_q25_ms": stats.q25_ms,
            "export/latency_q75_ms": stats.q75_ms,
        }
    )
    if latency.get("latency_ms"):
        metrics["export/speedup"] = latency["latency_ms"] / stats.median_ms
    return metrics


KEYS = ("model", "output", "tracking_uri")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m runner.export model=<URI or run id> output=<file>`: 0 on success, 2 with one line on
    stderr otherwise. The file gets .onnx, or .pt2 when only torch.export worked (the suffix is
    replaced to say which); the exported model's probabilities on the logged input example are
    compared with the PyTorch model's."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(main.__doc__)
        return 0
    args = dict(a.partition("=")[::2] for a in argv)
    bad = [k for k in args if k not in KEYS] + [k for k in ("model", "output") if not args.get(k)]
    if bad:
        print(
            f"runner.export: error: argument {bad[0]!r}: expected model=<models:/ URI or child run id> "
            f"output=<file> [tracking_uri=...], keys {list(KEYS)}",
            file=sys.stderr,
        )
        return 2
    try:
        shipped = load(args["model"], tracking_uri=args.get("tracking_uri"))
    except Exception as e:  # noqa: BLE001  (MLflow raises many types: one line says which)
        print(f"runner.export: error: model={args['model']!r}: cannot load it ({_summary(e)})", file=sys.stderr)
        return 2
    x = shipped.input_example
    x = {k: torch.as_tensor(v) for k, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x)
    exported = export_model(shipped.model, x)
    if exported.data is None:
        print(f"runner.export: error: model={args['model']!r} cannot be exported: {exported.reason}", file=sys.stderr)
        return 2
    output = Path(args["output"]).with_suffix(exported.suffix)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(exported.data)
    ported = torch.softmax(load_exported(exported.data, exported.format)(x).double(), dim=1)
    diff = float((ported - shipped.predict_proba(x)).abs().max())
    why = f" (not ONNX: {exported.reason})" if exported.reason else ""
    print(
        f"runner.export: wrote {output} ({exported.format}, {len(exported.data):,} bytes, "
        f"max |p - p_torch| {diff:.2g} on the input example){why}"
    )
    return 0


if __name__ == "__main__":
    quiet_libraries()
    sys.exit(main())

"""Where models and in-memory data live outside Lightning's fits.

Lightning trains on `trainer.accelerator` and hands the model back on the CPU. Everything else the
job does with a model (evaluation, latency, fusion fitting, the validation objective) runs on the
job's device too: `job_device` reads it from the `trainer` group and `on_device` moves the models
there for one step and back to the CPU after it, so what comes next (compression, export, logging)
finds them where it always does. int8 models keep to the CPU (their kernels exist only there) and
say why (`cpu_only`): torch's own int8 modules are known by their namespace, any other module says so
itself with a `cpu_only_reason` class attribute (runner.compress's int8 graphs do).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

CPU = torch.device("cpu")
# torch's int8 modules (torch.ao's quantize_dynamic and FX conversion): their kernels (FBGEMM / oneDNN / QNNPACK)
# exist on the CPU only
INT8_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")
INT8_CPU_ONLY = "int8: its kernels (oneDNN / FBGEMM) run on the CPU only"


def job_device(trainer_cfg: Mapping[str, Any]) -> torch.device:
    """The device of the `trainer` group: the first GPU it names (cuda:0 unless `devices` lists
    indices), Apple's MPS, or the CPU. `auto` picks a GPU when one is visible."""
    accelerator = trainer_cfg.get("accelerator", "cpu")
    indices = device_indices(trainer_cfg.get("devices", 1))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", indices[0] if indices else 0)
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return CPU


def device_indices(devices: Any) -> list[int] | None:
    """The device indices `trainer.devices` lists (a list, also an OmegaConf one), else None (a count)."""
    return [int(d) for d in devices] if isinstance(devices, Sequence) and not isinstance(devices, str) else None


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (the CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return CPU


def cpu_only(model: nn.Module) -> str:
    """Why `model` can only run on the CPU ("" if it can run anywhere): one of its modules is one of
    torch's int8 modules, or declares a `cpu_only_reason` (a class attribute, e.g. an int8 graph
    lowered to oneDNN or a TorchScript box of one)."""
    for module in model.modules():
        reason = getattr(type(module), "cpu_only_reason", "") or (
            INT8_CPU_ONLY if type(module).__module__.startswith(INT8_MODULES) else ""
        )
        if reason:
            return f"{type(model).__name__} is {reason}"
    return ""


def placement(model: nn.Module, device: torch.device) -> tuple[torch.device, str]:
    """Where `model` runs when the job's device is `device`, and why it is the CPU when it has to be."""
    if device.type == "cpu":
        return CPU, ""
    reason = cpu_only(model)
    return (CPU, reason) if reason else (device, "")


def data_on_device(datamodule: Any, device: torch.device, trainer_cfg: Mapping[str, Any]) -> bool:
    """Keep an in-memory source's splits on `device`, so training and evaluation slice their batches
    there (no copy per batch). Only on one device (DDP's processes take the CPU tensors) and for
    sources that slice tensors (`tensor_batches`); says whether it moved them."""
    devices = trainer_cfg.get("devices", 1)
    indices = device_indices(devices)
    one_device = str(trainer_cfg.get("strategy", "auto")) in ("auto", "single_device") and (
        len(indices) == 1 if indices is not None else str(devices) == "1"
    )
    if device.type == "cpu" or not one_device or not hasattr(datamodule, "to_device"):
        return False
    return datamodule.to_device(device)


@contextmanager
def on_device(models: nn.Module | Sequence[nn.Module], device: torch.device) -> Iterator[torch.device]:
    """Move `models` to `device` (each that can run there) for the body, and back to the CPU after it.

    Yields the device the first model runs on. A model's modules move in place, so a fused model that
    holds the members moves them too, and they all come back together."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    placed = [placement(m, device)[0] for m in models]
    try:
        for model, where in zip(models, placed):
            model.to(where)
        yield placed[0] if placed else CPU
    finally:
        if device.type != "cpu":
            for model in models:
                model.to(CPU)

"""Models from timm and torchvision, optional libraries (the `vision` extra).

PyPI's Linux torchvision wheel is a CUDA build that fails at import next to a CPU torch (a
RuntimeError, not an ImportError), so both failures become a ConfigError saying what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import nn

from runner.errors import ConfigError, check
from runner.models.facts import set_head_name


def _import(library: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(library)
    except (ImportError, RuntimeError):
        raise ConfigError(
            "model.name",
            name,
            f"{library} is not installed: pip install -e '.[vision]' with a "
            "torchvision build that matches your torch (see README)",
        ) from None


def last_linear_name(model: nn.Module, out_features: int | None = None) -> str | None:
    """Qualified name of the last nn.Linear registered in `model` (with `out_features` outputs if
    given): the classifier layer of the usual backbone + head models. None if there is none."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (out_features is None or m.out_features == out_features)
    ]
    return names[-1] if names else None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at qualified `name` ("classifier.1", "fc") for `new`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def timm_model(name: str, num_classes: int, pretrained: bool = False, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """timm.create_model(name, ...) with a `num_classes`-way classifier (timm re-initialises it
    when loading pretrained weights). Its last Linear layer is recorded as its head (runner.models.facts)."""
    timm = _import("timm", name)
    check(timm.is_model(name), "model.name", name, "a timm model name (timm.list_models())")
    check(isinstance(num_classes, int) and num_classes >= 2, "model.num_classes", num_classes, "an integer >= 2")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    set_head_name(model, last_linear_name(model, out_features=num_classes))
    return model


def torchvision_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """torchvision.models.get_model(name). Without weights the model is built with `num_classes`
    outputs; with weights (e.g. "DEFAULT", "IMAGENET1K_V1") it is built with them and its last
    Linear layer is replaced by a fresh one with `num_classes` outputs. That layer is recorded as its
    head (runner.models.facts)."""
    torchvision = _import("torchvision", name)
    available = torchvision.models.list_models()
    check(name.lower() in available, "model.name", name, f"a torchvision model: {available}")
    check(isinstance(num_classes, int) and num_classes >= 2, "model.num_classes", num_classes, "an integer >= 2")
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        head = last_linear_name(model)
    else:
        model = torchvision.models.get_model(name, weights=weights)
        head = last_linear_name(model)
        check(head is not None, "model.name", name, "a torchvision model with a Linear classifier")
        old = model.get_submodule(head)
        replace_module(model, head, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    set_head_name(model, head)
    return model

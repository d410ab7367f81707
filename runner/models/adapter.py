"""One features/head split for every model: `features(model, x)` and `head(model, f)`.

Feature-level fusion and feature distillation need what a classifier computes just before its
final layer. Found, in this order:
- our nets (runner.models.Net): `forward_features` / `forward_head`;
- timm models: `forward_head(forward_features(x), pre_logits=True)` and `get_classifier()`;
- any other nn.Module: the input of its final classifier layer, named by `head:` in the model's
  YAML (e.g. `head: classifier`, recorded in runner.models.facts, never set on the model), by the
  model's own `head_name` (Hugging Face wrappers have one), or else the last nn.Linear it registers. The features are caught by a forward pre-hook
  while the whole model runs, so nothing about the model has to change.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from runner.batches import Inputs
from runner.errors import ConfigError, check
from runner.models.facts import declared_head_name, set_head_name


def _is_timm(model: nn.Module) -> bool:
    head = getattr(model, "forward_head", None)
    return head is not None and "pre_logits" in inspect.signature(head).parameters


def _own_split(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "forward_head") and not _is_timm(model)


def head_name(model: nn.Module) -> str | None:
    """The qualified name of the final classifier layer (None if the model has no nn.Linear)."""
    name = declared_head_name(model)
    if name:
        return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def head_module(model: nn.Module) -> nn.Module:
    """The final classifier layer."""
    if _own_split(model) and isinstance(getattr(model, "head", None), nn.Module):
        return model.head
    if _is_timm(model):
        return model.get_classifier()
    name = head_name(model)
    check(name is not None, "model.head", None, "the name of the final classifier layer (the model has no nn.Linear)")
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        check(False, "model.head", name, f"a submodule of {type(model).__name__}, e.g. one of {names[-5:]}")


def features(model: nn.Module, x: Inputs) -> Tensor:
    """What the final classifier layer sees, flattened to (batch, width)."""
    if _own_split(model):
        return model.forward_features(x).flatten(1)
    if _is_timm(model):
        return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
    caught: list[Tensor] = []
    hook = head_module(model).register_forward_pre_hook(lambda _, args: caught.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    check(
        len(caught) == 1,
        "model.head",
        head_name(model),
        f"the final classifier layer of {type(model).__name__}, called once per forward pass (this one ran "
        f"{len(caught)} times): name it with `head:` in the model's YAML",
    )
    return caught[0].flatten(1)


def head(model: nn.Module, f: Tensor) -> Tensor:
    """Logits from features: the final classifier layer (our nets' `forward_head`)."""
    if _own_split(model):
        return model.forward_head(f)
    return head_module(model)(f)


@torch.no_grad()
def check_split(model: nn.Module, x: Inputs, key: str = "model") -> int:
    """Check that head(features(x)) gives the model's output on `x`; returns the feature width."""
    was_training = model.training
    model.eval()
    try:
        out, f = model(x), features(model, x)
        check(
            f.dim() == 2 and torch.allclose(head(model, f).float(), out.float(), atol=1e-4, rtol=1e-4),
            f"{key}.head",
            head_name(model),
            f"the final classifier layer of {type(model).__name__} (name it with `head:` in the model's YAML; "
            "its input must be (batch, width) and its output the model's logits)",
        )
    finally:
        model.train(was_training)
    return f.shape[1]


@torch.no_grad()
def check_forward(
    model: nn.Module, x: Inputs, num_classes: int, key: str = "model", input_spec: dict | None = None
) -> None:
    """One forward pass on real inputs before any training: the model must take them and return
    logits of shape (batch, num_classes). A mismatch is a ConfigError naming the model and data."""
    was_training = model.training
    model.eval()
    what = f"{type(model).__name__} on data inputs {input_spec}"
    try:
        out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure here is a model that does not fit the data
        raise ConfigError(
            f"{key} / data",
            what,
            "a model that takes this data's inputs: "
            f"{type(e).__name__}: {e} (pick a model for this data: images need an image "
            "model or data.input_shape, token ids a text model)",
        ) from None
    finally:
        model.train(was_training)
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    check(
        isinstance(out, Tensor) and shape == (n, num_classes),
        f"{key} / data.num_classes",
        f"{what} returned {shape}",
        f"logits of shape ({n}, {num_classes}): one score per class (data.num_classes={num_classes})",
    )


def build_model(node: Any, key: str = "model") -> nn.Module:
    """Build a model config (any `_target_` returning an nn.Module). `head:` in the node names the
    final classifier layer for the features/head split, unless the constructor takes `head` itself."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from runner.config import build, interpolation_error

    try:
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node))
    except OmegaConfBaseException as e:
        raise interpolation_error(e, key) from None
    name = checkpoint = None
    target = node.get("_target_")
    taken = _parameters(target) if target else []
    if "head" in node and isinstance(node.get("head"), str) and target and "head" not in taken:
        with open_dict(node):
            name = node.pop("head")
    if "checkpoint" in node and target and "checkpoint" not in taken:
        with open_dict(node):
            checkpoint = node.pop("checkpoint")
    net = build(node, key)
    check(
        isinstance(net, nn.Module),
        f"{key}._target_",
        target,
        "a callable returning an nn.Module whose forward returns logits",
    )
    if name:
        set_head_name(net, name)
        head_module(net)  # a wrong name fails here, naming model.head
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, f"{key}.checkpoint")
    return net


def read_state_dict(path: str, key: str) -> dict[str, Tensor]:
    """A state_dict from a .safetensors file or a torch file (a state_dict, or a dict holding one
    under `state_dict`, as Lightning checkpoints do), read on the CPU without running pickled code."""
    from pathlib import Path

    file = Path(str(path)).expanduser()
    check(file.is_file(), key, str(path), "an existing weights file (.pt, .pth, .ckpt, .bin or .safetensors)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, not a tensor file...
        raise ConfigError(
            key, str(path), f"a readable weights file ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    check(
        isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values()),
        key,
        str(path),
        "a file holding a state_dict (names -> tensors)",
    )
    return state


def state_dict_problems(
    own: dict[str, Tensor], state: dict[str, Tensor], exempt: set[str] = frozenset(), may_miss: set[str] = frozenset()
) -> list[str]:
    """What keeps `state` from loading into a model whose state_dict is `own`: missing keys (bar `may_miss`),
    unexpected keys, and shape mismatches (bar `exempt`), each a line listing the first 8 names."""
    missing = sorted(set(own) - set(state) - set(may_miss))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in set(own) & set(state) - set(exempt)
        if state[k].shape != own[k].shape
    )
    return [
        f"{what} ({len(names)}): {names[:8]}{' ...' if len(names) > 8 else ''}"
        for what, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if names
    ]


def load_checkpoint(net: nn.Module, path: str, key: str, state: dict[str, Tensor] | None = None) -> None:
    """Load weights into `net`, strictly: every name must match and every shape agree, or a
    ConfigError naming `key` lists the missing, unexpected and mismatched names."""
    state = read_state_dict(path, key) if state is None else state
    own = net.state_dict()
    if set(state) != set(own) and all(k.startswith(("net.", "model.")) for k in state):
        prefix = next(iter(state)).split(".", 1)[0] + "."  # a Lightning checkpoint of LitClassifier (net.*)
        state = {k[len(prefix) :]: v for k, v in state.items()}
    problems = state_dict_problems(own, state)
    check(
        not problems,
        key,
        str(path),
        f"weights for {type(net).__name__} with the same names and shapes; " + "; ".join(problems),
    )
    net.load_state_dict(state)


def _parameters(target: str) -> list[str]:
    from hydra.utils import get_object

    try:
        return list(inspect.signature(get_object(target)).parameters)
    except Exception:  # noqa: BLE001 - build() reports a bad target with its key
        return []

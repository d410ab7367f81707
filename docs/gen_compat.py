"""The compatibility page, generated at build time from what the classes declare: every recipe in
conf/compress with the requirements its steps' classes declare (`Step.requires`), every strategy in
conf/fuse with its class's `requires` and what it fuses (`fuses_outputs`), and what each requirement
means (runner.compress.requirements.MEANING, runner.fuse.base.MEANING). The checks that enforce them
read the same declarations, so this page and the refusals cannot drift apart.

mkdocs-gen-files runs this file (mkdocs.yml); `page()` is plain Python (tests/contract/test_readme.py).
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import get_class

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OUT = "reference/compatibility.md"


def _group(group: str) -> dict[str, object]:
    """option -> its composed node, for every YAML of a config group (none: no recipe / strategy)."""
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "none")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return {name: compose("config", overrides=[f"{group}={name}"])[group] for name in names}


def recipes() -> dict[str, list[type]]:
    """recipe -> the classes of its steps, in order."""
    return {name: [get_class(s["_target_"]) for s in node.steps] for name, node in _group("compress").items()}


def strategies() -> dict[str, type]:
    return {name: get_class(node["_target_"]) for name, node in _group("fuse").items()}


def _names(requires: frozenset[str] | set[str]) -> str:
    return ", ".join(f"`{r}`" for r in sorted(requires)) or "-"


def page() -> str:
    from runner.compress.requirements import MEANING as STEP_MEANING
    from runner.fuse.base import MEANING as FUSION_MEANING

    lines = [
        "# Compatibility",
        "",
        "Generated from the classes' declarations (`requires`) when the docs are built; the checks that",
        "refuse a model before training read the same declarations. A step's settings can add checks of",
        "their own (a pruning step's `min_params`, channel multiples, a student that must fit the data).",
        "",
        "## Compression recipes",
        "",
        "| recipe | steps | requires of the model |",
        "|---|---|---|",
    ]
    for name, steps in recipes().items():
        needs = set().union(*(s.requires for s in steps))
        lines.append(f"| `{name}` | {' -> '.join(s.__name__ for s in steps)} | {_names(needs)} |")
    lines += ["", "| requirement | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in STEP_MEANING.items()]
    lines += [
        "",
        "## Fusion strategies",
        "",
        "| strategy | class | fuses | requires of the members |",
        "|---|---|---|---|",
    ]
    for name, cls in strategies().items():
        fuses = "outputs" if cls.fuses_outputs else ("weights" if "shared_start" in cls.requires else "features")
        lines.append(f"| `{name}` | {cls.__name__} | {fuses} | {_names(cls.requires)} |")
    lines += ["", "| requirement | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in FUSION_MEANING.items()]
    return "\n".join(lines) + "\n"


if __name__ in {"__main__", "<run_path>"}:  # run by mkdocs-gen-files
    import mkdocs_gen_files

    with mkdocs_gen_files.open(OUT, "w") as f:
        f.write(page())
    mkdocs_gen_files.set_edit_path(OUT, "gen_compat.py")

"""The config reference, generated at build time from conf/: one page per config group, one section per
option, made of the leading comment block of its YAML file (the file itself folded beneath).

mkdocs-gen-files runs this file (mkdocs.yml); `pages()` is plain Python, so tests/contract/test_readme.py
checks what it writes without building the site.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OUT = "reference/config"
DESCRIBED = {
    "": "The root config, `conf/config.yaml`: the groups a job composes and the top-level keys.",
    "data": "Data sources: seeded stratified train / val / test splits (`data=<option>`).",
    "model": "Networks: any `nn.Module` whose forward returns logits (`model=<option>`).",
    "ensemble": "Ensemble members: model configs x seeds (`ensemble=<option>`; null: one member).",
    "compress": "Compression recipes: an ordered list of steps applied to every member (`compress=<option>`).",
    "fuse": "Fusion strategies, fitted on the validation split only (`fuse=<option>`).",
    "merge": "Merging a pool of task fine-tunes into one multi-task model (`merge=<option>`, with `tasks`).",
    "trainer": "Lightning Trainer settings (`trainer=<option>`).",
    "tracking": "Where MLflow logs (`tracking=<option>`).",
    "experiment": "Whole experiments and sweeps (`experiment=<option>`, usually with `-m`).",
    "hydra/launcher": "Hydra launcher presets for clusters (`hydra/launcher=<option>`).",
    "report": "`python -m runner.report`'s own config root.",
    "report/preset": "Report presets: which runs, rows and metrics make a table (`python -m runner.report preset=<option>`).",
}


def groups(conf: Path = CONF) -> dict[str, list[Path]]:
    """Every folder of conf/ holding YAML files (a config group; '' is conf/ itself), with its files."""
    found: dict[str, list[Path]] = {}
    for path in sorted(conf.rglob("*.yaml")):
        group = path.parent.relative_to(conf).as_posix()
        found.setdefault("" if group == "." else group, []).append(path)
    return found


def page_name(group: str) -> str:
    """reference/config/<group>.md, with '/' as '-'; the root config is the index page."""
    return f"{OUT}/{group.replace('/', '-') or 'index'}.md"


def header(text: str) -> list[str]:
    """The leading comment block of a YAML file, '#' and one space removed; Hydra's `# @package` line skipped."""
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            out.append(line[2:] if line.startswith("# ") else line[1:])
    return out


def _escape(line: str) -> str:
    """Angle brackets outside code spans as entities, so `<host>` shows instead of vanishing as HTML."""
    parts = line.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def prose(comment: list[str]) -> str:
    """Comment lines as Markdown: lines indented further (commands) become bash blocks, the rest paragraphs."""
    blocks: list[str] = []
    code: list[str] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            blocks.append("\n".join(text))
            text.clear()
        if code:
            blocks.append("```bash\n" + "\n".join(code) + "\n```")
            code.clear()

    for line in comment:
        if line.startswith("  ") and line.strip():
            if text:
                flush()
            code.append(line.strip() if not code else line[2:])
        elif not line.strip():
            flush()
        else:
            if code:
                flush()
            text.append(_escape(line))
    flush()
    return "\n\n".join(blocks)


def option_section(path: Path, conf: Path = CONF) -> str:
    text = path.read_text()
    rel = path.relative_to(conf.parent).as_posix()
    body = prose(header(text)) or "*(no header comment)*"
    folded = "\n".join("    " + line if line else "" for line in ["```yaml", *text.rstrip("\n").splitlines(), "```"])
    return f'## {path.stem}\n\n{body}\n\n??? note "{rel}"\n\n{folded}\n'


def group_page(group: str, files: list[Path], all_groups: list[str], conf: Path = CONF) -> str:
    title = f"`{group}`" if group else "Config groups"
    lines = [f"# {title}", "", DESCRIBED.get(group, f"`conf/{group}/`."), ""]
    if not group:
        lines += ["| group | page | options |", "|---|---|---|"]
        for other in all_groups:
            if other:
                options = ", ".join(p.stem for p in groups(conf)[other])
                lines.append(f"| `{other}` | [{other}]({page_name(other).rsplit('/', 1)[1]}) | {options} |")
        lines.append("")
    lines.append("Generated from the YAML files' leading comments in `conf/` when the site is built.")
    lines.append("")
    sections = [option_section(path, conf) for path in files]
    return "\n".join(lines) + "\n" + "\n".join(sections)


def pages(conf: Path = CONF) -> dict[str, str]:
    """{page path under docs/: Markdown} for every config group."""
    found = groups(conf)
    names = sorted(found, key=lambda g: (g != "", g))
    return {page_name(g): group_page(g, found[g], names, conf) for g in names}


if __name__ in {"__main__", "<run_path>"}:  # run by mkdocs-gen-files
    import mkdocs_gen_files

    for name, markdown in pages().items():
        with mkdocs_gen_files.open(name, "w") as f:
            f.write(markdown)
        mkdocs_gen_files.set_edit_path(name, "gen_reference.py")

"""README and the docs site: a short README whose links land on docs pages, every results/*.md included by
a docs page beside the command that made it, the figures the results pages quote found in the tables
they include, and a config reference that covers every YAML in conf/. `make docs` builds the site
strictly (broken links, anchors and includes fail it); these check what a build cannot."""

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$', re.M)
RESULTS = sorted(p for p in (ROOT / "results").glob("*.md") if p.name != "README.md")
REPORTS = [p for p in RESULTS if p.with_suffix(".csv").exists()]  # written by python -m runner.report


def doc_pages() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(DOCS.rglob("*.md"))}


def includes() -> dict[str, list[Path]]:
    """{included path: [docs pages including it]}."""
    found: dict[str, list[Path]] = {}
    for page, text in doc_pages().items():
        for path in INCLUDE.findall(text):
            found.setdefault(path, []).append(page)
    return found


def first_table(markdown: str) -> str:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def gen_reference(name: str = "gen_reference"):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nav_pages() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    out: list[str] = []

    def walk(node):
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(config["nav"])
    return out


# README


def test_readme_is_short():
    assert len(README.splitlines()) < 200


def test_readme_gives_the_two_commands_and_the_makefile_has_them():
    assert "make run    # set up (.venv, CPU PyTorch, the package) and run the default experiment" in README
    assert "make test   # set up and run the tests" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: .*\bdocs\b", makefile, re.M)
    assert re.search(r"^docs: .*\n\t.*mkdocs build --strict", makefile, re.M)


def test_readme_links_land_on_existing_docs_pages_in_the_nav():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README)
    assert len(links) >= 15, links  # the docs map: home, concepts, how-to guides, results, reference
    nav = {f"docs/{page}" for page in nav_pages()}
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which is no docs page"
        assert link in nav, f"README links to {link}, which the site's nav does not list"


def test_readme_default_experiment_summary_is_the_one_the_docs_show():
    summary = re.search(r"```\nmodel +acc.*?```", README, re.S).group(0)
    assert summary in (DOCS / "index.md").read_text()


# results: included, never copied


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_is_included_by_a_docs_page(path):
    assert f"results/{path.name}" in includes(), f"no docs page includes results/{path.name}"


def test_every_include_names_an_existing_file():
    for path, pages in includes().items():
        assert (ROOT / path).is_file(), f"{[str(p.relative_to(ROOT)) for p in pages]} include missing {path}"


def test_no_docs_page_or_readme_copies_a_results_table():
    """A table lives in results/ only: the pages include it (pymdownx.snippets) instead of pasting it."""
    texts = {**doc_pages(), ROOT / "README.md": README}
    for result in REPORTS:
        table = first_table(result.read_text())
        for page, text in texts.items():
            assert table not in text, f"{page.relative_to(ROOT)} copies results/{result.name}'s table: include it"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_the_command_that_made_a_results_file_is_beside_its_include(path):
    produced = re.search(r"Produced by `([^`]+)`", path.read_text())
    assert produced, f"results/{path.name} does not say what produced it"
    command = produced.group(1)
    preset = re.search(r"runner\.report preset=(\S+)", command)
    needle = f"preset={preset.group(1)}" if preset else re.search(r"benchmarks/\S+\.py", command).group(0)
    for page in includes()[f"results/{path.name}"]:
        text = page.read_text()
        at = text.index(f'--8<-- "results/{path.name}"')
        section = text[at : at + 1500]  # the include, then its commands
        assert needle in section, f"{page.relative_to(ROOT)}: no `{needle}` beside results/{path.name}"
        if preset:
            assert "python -m runner -m experiment=" in section, f"{page.name}: no experiment beside {path.name}"


@pytest.mark.parametrize("png", sorted((ROOT / "results").glob("*.png")), ids=lambda p: p.name)
def test_every_plot_in_results_is_shown_by_a_results_page(png):
    """docs/gen_plots.py puts results/*.png beside the results pages at build time; a page shows each."""
    assert any(f"]({png.name})" in p.read_text() for p in (DOCS / "results").glob("*.md")), f"no page shows {png.name}"


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.name)
def test_results_files_name_their_commit_and_command(path):
    text = path.read_text()
    assert "code commit(s) " in text and "Produced by `python -m runner.report preset=" in text


def quoted_figures(page: str) -> list[tuple[str, str]]:
    """('mean ± std', paragraph) for every figure the page's prose quotes, outside tables, code and the
    paragraphs that name a benchmark script (those quote the script's output, not a results file)."""
    out = []
    text = re.sub(r"```.*?```", "", page, flags=re.S)
    for paragraph in text.split("\n\n"):
        if paragraph.startswith("|") or "benchmarks/" in paragraph:
            continue
        out += [(m, paragraph) for m in re.findall(r"\d+\.\d+ ± \d+\.\d+", paragraph)]
    return out


RESULTS_PAGES = sorted((DOCS / "results").glob("*.md"))


@pytest.mark.parametrize("page", RESULTS_PAGES, ids=lambda p: p.name)
def test_figures_quoted_in_results_pages_are_in_the_tables_they_include(page):
    text = page.read_text()
    tables = "\n".join((ROOT / path).read_text() for path in INCLUDE.findall(text))
    for figure, paragraph in quoted_figures(text):
        assert figure in tables, (
            f"{page.name} quotes {figure}, which none of its results files holds: {paragraph[:120]}"
        )


def test_results_pages_quote_figures():
    """The check above has something to check: the pages do quote the tables."""
    assert sum(len(quoted_figures(p.read_text())) for p in RESULTS_PAGES) >= 5


# what the pages name exists


PATH = re.compile(r"(?<![\w/.(-])(?:runner|tests|benchmarks|examples|conf|results)/[\w./-]+\.(?:py|yaml|md|png)\b")


def test_files_the_readme_and_docs_name_exist():
    """A file a page names (`runner/measure.py`, `conf/ensemble/finetune5.yaml`) is there: code that moves
    takes its docs along."""
    texts = {**doc_pages(), ROOT / "README.md": README}
    missing = {
        f"{page.relative_to(ROOT)}: {path}"
        for page, text in texts.items()
        for path in PATH.findall(text)
        if not (ROOT / path).exists() and not page.is_relative_to(DOCS / "reference")
    }
    assert not missing, sorted(missing)


# the config reference and the nav


def test_reference_covers_every_yaml_in_conf_with_its_header_comment():
    ref = gen_reference()
    pages = ref.pages()
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        group = path.parent.relative_to(ROOT / "conf").as_posix()
        page = pages[ref.page_name("" if group == "." else group)]
        assert f"## {path.stem}\n" in page, f"the reference has no section for {path.relative_to(ROOT)}"
        for line in ref.header(path.read_text()):
            if line.strip() and not line.startswith("  "):
                assert ref._escape(line) in page, f"{path.relative_to(ROOT)}'s comment `{line}` is not in the reference"


def test_header_drops_the_package_directive_and_stops_at_the_first_key():
    ref = gen_reference()
    text = "# @package _global_\n# What it is.\n#   python -m runner x=1\nkey: 1\n# not the header\n"
    assert ref.header(text) == ["What it is.", "  python -m runner x=1"]
    assert ref.prose(ref.header(text)) == "What it is.\n\n```bash\npython -m runner x=1\n```"


def test_nav_lists_every_page_and_every_generated_reference_page():
    nav = set(nav_pages())
    written = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    generated = set(gen_reference().pages()) | {gen_reference("gen_compat").OUT}
    assert written | generated == nav, (
        f"not in the nav: {(written | generated) - nav}; missing: {nav - written - generated}"
    )


def test_the_compatibility_page_lists_every_recipe_and_strategy_with_what_its_classes_declare():
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    page = gen_reference("gen_compat").page()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    for group in ("compress", "fuse"):
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            if path.stem == "none":
                continue
            node = OmegaConf.load(path)
            classes = (
                [get_class(s["_target_"]) for s in node.steps] if group == "compress" else [get_class(node._target_)]
            )
            needs = set().union(*(c.requires for c in classes))
            assert path.stem in rows, path
            assert all(f"`{r}`" in rows[path.stem] for r in needs), (path.stem, needs, rows[path.stem])

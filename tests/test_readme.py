"""Every table README shows from results/ is the one the report tool wrote there."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_README = [
    "mnist1d_paper",
    "fusion_members",
    "fusion",
    "compression_members",
    "compression",
    "image_mnist5k",
    "image_mnist5k_fusion",
    "deep_compression_lenet300",
    "prune_resnet20",
    "distill_lenet5",
    "merge_lenet5",
    "minilm_rt_finetune",
    "minilm_rt_fusion",
    "minilm_rt_compress",
    "minilm_rt_distill",
    "efficientnet_elpv_finetune",
    "efficientnet_elpv_compress",
    "efficientnet_elpv_fusion",
]


def first_table(markdown: str) -> str:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("name", IN_README)
def test_readme_tables_equal_the_results_files(name):
    table = first_table((ROOT / "results" / f"{name}.md").read_text())
    assert table in (ROOT / "README.md").read_text(), f"README's {name} table differs from results/{name}.md"


@pytest.mark.parametrize("name", IN_README)
def test_results_files_name_their_commit_and_command(name):
    text = (ROOT / "results" / f"{name}.md").read_text()
    assert "code commit(s) " in text and "Produced by `python -m runner.report preset=" in text

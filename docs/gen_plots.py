"""The report tool's plots (results/*.png) into the built site beside the results pages, at build time, so the
pages show them without a second copy in docs/. Run by mkdocs-gen-files (mkdocs.yml)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ in {"__main__", "<run_path>"}:
    import mkdocs_gen_files

    for png in sorted((ROOT / "results").glob("*.png")):
        with mkdocs_gen_files.open(f"results/{png.name}", "wb") as f:
            f.write(png.read_bytes())

"""Command line: `python -m runner.report [preset=<name>] [key=value ...]` (Hydra; conf/report/config.yaml)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../../conf/report", config_name="config")
def main(cfg: DictConfig) -> None:
    from runner.report import ReportError, make_report

    try:
        make_report(cfg)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

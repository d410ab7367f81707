"""Command line: `python -m runner.report [preset=<name>] [key=value ...]` (Hydra; conf/report/config.yaml)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../../conf/report", config_name="config")
def main(cfg: DictConfig) -> None:
    from runner.report import ReportError, make_report  # after Hydra: --help imports no pandas or matplotlib

    try:
        make_report(cfg)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)


def default_name(argv: list[str]) -> list[str]:
    """A sweep's report is named after the sweep (outputs/reports/<sweep id>/), so reports of different
    sweeps do not overwrite each other; `name=` on the command line wins."""
    sweep = next((a.split("=", 1)[1] for a in argv if a.startswith("sweep=")), "")
    if sweep and sweep != "null" and not any(a.startswith(("name=", "preset=")) for a in argv):
        return [*argv, f"name={sweep}"]
    return argv


if __name__ == "__main__":
    from runner.quiet import quiet_libraries  # the command's entry only

    quiet_libraries()
    sys.argv[1:] = default_name(sys.argv[1:])
    main()

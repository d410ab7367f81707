"""Command line: `python -m runner [group=option ...] [key=value ...]` (Hydra; -m for multirun)."""

from __future__ import annotations

import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import runner.config  # noqa: F401  (registers the schema before Hydra composes; imports no torch)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # so a terminated job's MLflow run ends as KILLED


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from runner.errors import ConfigError, TrainingDiverged
    from runner.quiet import quiet_libraries

    quiet_libraries()

    try:
        return _main(cfg)
    except (ConfigError, TrainingDiverged) as e:  # a bad value: one line (in a sweep the job fails as any job does)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"runner.errors.{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def _main(cfg: DictConfig) -> float:
    from runner.config import build, validate
    from runner.tracking.sweep import read_sweep

    signal.signal(signal.SIGTERM, _interrupt)
    validate(cfg)  # bad values fail here, before the heavy imports
    tracker = build(cfg.tracking, "tracking")  # imports no mlflow: the first MLflow call does
    from runner.pipeline import run

    hydra_cfg = HydraConfig.get()
    sweep = read_sweep(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    # the option picked in every config group (model=cnn1d, fuse=mean), comparable across runs
    choices = {
        f"choice/{group}": option
        for group, option in hydra_cfg.runtime.choices.items()
        if not group.startswith("hydra") and "@" not in group
    }
    results = run(
        cfg,
        overrides=list(hydra_cfg.overrides.task),
        tracker=tracker,
        choices=choices,
        parent_id=sweep and sweep["run_id"],
        tags=sweep and {"sweep_id": sweep["sweep_id"]},
    )
    return results.get("objective/val_acc", float("nan"))  # what sweepers such as Optuna maximize


if __name__ == "__main__":
    main()

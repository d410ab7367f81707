"""Command line: `python -m runner [group=option ...] [key=value ...]` (Hydra; -m for multirun)."""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import runner.config  # noqa: F401  (registers the schema before Hydra composes)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from runner.pipeline import run

    results = run(cfg, overrides=list(HydraConfig.get().overrides.task))
    accuracies = [v for k, v in results.items() if k.endswith("/test/acc")]
    return max(accuracies) if accuracies else float("nan")


if __name__ == "__main__":
    main()

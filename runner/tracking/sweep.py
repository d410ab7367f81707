"""Group the jobs of one Hydra sweep under one MLflow parent run, whatever the launcher.

A Hydra callback creates the sweep's run when the multirun starts (in the launching process) and
writes its id to `<sweep dir>/mlflow_sweep.json`; every job (local process, joblib worker or SLURM
task) reads that file and nests its own run under it with a `sweep_id` tag.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig

FILE = "mlflow_sweep.json"


class SweepRun(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_id = f"{sweep_dir.name}-{uuid.uuid4().hex[:8]}"
        tracker = instantiate(config.tracking)
        run_id = tracker.start_run(f"sweep {sweep_id}", tags={
            "role": "sweep", "sweep_id": sweep_id, "overrides": " ".join(config.hydra.overrides.task)})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / FILE).write_text(json.dumps({"run_id": run_id, "sweep_id": sweep_id}))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = read_sweep(str(config.hydra.sweep.dir))
        if info:
            instantiate(config.tracking).end_run(info["run_id"], "FINISHED")


def read_sweep(sweep_dir: str) -> dict[str, str] | None:
    path = Path(sweep_dir) / FILE
    return json.loads(path.read_text()) if path.exists() else None

"""Group the jobs of one Hydra sweep under one MLflow parent run, whatever the launcher.

A Hydra callback creates the sweep's run when the multirun starts (in the launching process) and
writes its id to `<sweep dir>/mlflow_sweep.json`; every job (local process, joblib worker or SLURM
task) reads that file and nests its own run under it with a `sweep_id` tag.

The parent run ends with its sweep: FINISHED when every job finished, FAILED when one failed (each
job that fails leaves a marker in `<sweep dir>/failed/`, which works across processes and nodes),
KILLED when the launching process is interrupted. A relaunch of the same sweep (same experiment,
same command-line overrides) continues under the same parent run.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from runner.config import check_seed_sweep

FILE = "mlflow_sweep.json"
FAILED = "failed"
DONE = "done"  # a marker per ended job, for the sweep's progress line (works across processes and nodes)
BAR = 20

log = logging.getLogger("runner.progress")


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs the sweep launches: the sweeper's n_trials (Optuna), else the product of the
    sizes of the sweep's lists and ranges (hydra.sweeper.params, overridden by the command line);
    None when a sweep cannot be counted ahead (e.g. glob)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("n_trials"):
        return int(sweeper.n_trials)
    items = {str(k): f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()}
    items.update({o.split("=", 1)[0]: o for o in config.hydra.overrides.task})
    total = 1
    try:
        for override in OverridesParser.create().parse_overrides(list(items.values())):
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    return None
                total *= len(list(override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001  (e.g. glob needs Hydra's config loader: no count, no ETA)
        return None
    return total


def progress_line(done: int, total: int | None, elapsed_s: float, job: int | None = None) -> str:
    """`sweep [#####---------------] job 6 of 20, 1m40s elapsed, ETA 4m40s`: the bar and the ETA (the
    mean time per ended job times the jobs left; none before the first ends) count the `done` jobs;
    `job` is this job's number from 1 (Hydra's job.num + 1: unique when a launcher runs several at
    once), `done + 1` when not given."""
    from runner.progress import duration  # here: runner.progress imports Lightning; reading a sweep does not

    job = job or done + 1
    if not total:
        return f"sweep: job {job}, {duration(elapsed_s)} elapsed"
    filled = round(BAR * done / total)
    eta = f", ETA {duration(elapsed_s / done * (total - done))}" if done else ""
    return f"sweep [{'#' * filled}{'-' * (BAR - filled)}] job {job} of {total}, {duration(elapsed_s)} elapsed{eta}"


def top_level_split(value: str) -> list[str]:
    """`0,1,2` -> three values; `[0,1],[2,3]` -> two lists (commas inside brackets stay)."""
    parts, depth, current = [], 0, ""
    for char in value:
        depth += 1 if char in "[{(" else -1 if char in "]})" else 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def swept_values(config: DictConfig) -> dict[str, list[str]]:
    """key -> its values in this sweep: command-line overrides over the sweeper's params."""
    values = {
        str(k): top_level_split(str(v)) for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()
    }
    for item in OmegaConf.select(config, "hydra.overrides.task") or []:
        key, sep, value = str(item).lstrip("+~").partition("=")
        if sep:
            values[key] = top_level_split(value)
    return values


def sweep_key(config: DictConfig) -> str:
    """The same sweep launched again has the same key: experiment name, overrides and sweep params."""
    what = {
        "experiment": str(config.tracking.experiment),
        "overrides": sorted(config.hydra.overrides.task),
        "params": {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class SweepRun(Callback):
    def __init__(self) -> None:
        self._open: tuple[Any, str, Path] | None = None  # (tracker, run_id, sweep dir) until the sweep ends

    def __getstate__(self) -> dict:  # parallel launchers pickle callbacks; the open run stays here
        return {"_open": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_seed_sweep(OmegaConf.select(config, "ensemble.seeds"), swept_values(config))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        tracker, key = instantiate(config.tracking), sweep_key(config)
        earlier = tracker.find_runs({"role": "sweep", "sweep_key": key})
        if earlier:  # a relaunch: the jobs that finished are skipped, the rest nest under the same run
            run_id, sweep_id = earlier[0].run_id, earlier[0].tags["sweep_id"]
            tracker.reopen_run(run_id)
        else:
            sweep_id = f"{sweep_dir.name}-{uuid.uuid4().hex[:8]}"
            run_id = tracker.start_run(
                f"sweep {sweep_id}",
                tags={
                    "role": "sweep",
                    "sweep_id": sweep_id,
                    "sweep_key": key,
                    "overrides": " ".join(config.hydra.overrides.task),
                },
            )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        for folder in (FAILED, DONE):  # this launch's failures and progress only
            shutil.rmtree(sweep_dir / folder, ignore_errors=True)
        (sweep_dir / FILE).write_text(
            json.dumps({"run_id": run_id, "sweep_id": sweep_id, "jobs": sweep_size(config), "started": time.time()})
        )
        self._open = (tracker, run_id, sweep_dir)
        experiment = str(config.tracking.experiment)
        log.info(
            "sweep %s (MLflow run %s, experiment %s); its report: python -m runner.report sweep=%s experiment=%s",
            sweep_id,
            run_id,
            experiment,
            sweep_id,
            experiment,
        )
        atexit.register(self._interrupted)  # Hydra raises past on_multirun_end when a job fails

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's progress, one line as each job starts."""
        if not _multirun(config):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        info = read_sweep(str(sweep_dir)) or {}
        if "started" in info:
            done = len(list((sweep_dir / DONE).glob("*")))
            log.info(
                progress_line(done, info.get("jobs"), time.time() - info["started"], int(config.hydra.job.num) + 1)
            )

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _multirun(config):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        markers = [DONE, FAILED] if job_return.status == JobStatus.FAILED else [DONE]
        for name in markers:
            (sweep_dir / name).mkdir(parents=True, exist_ok=True)
            (sweep_dir / name / str(config.hydra.job.num)).touch()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end(None)

    def _interrupted(self) -> None:
        self._end("KILLED")

    def _end(self, otherwise: str | None) -> None:
        if self._open is None:
            return
        tracker, run_id, sweep_dir = self._open
        self._open = None
        failed = any((sweep_dir / FAILED).glob("*"))
        tracker.end_run(run_id, "FAILED" if failed else otherwise or "FINISHED")


def _multirun(config: DictConfig) -> bool:
    return bool(config.hydra.mode) and str(config.hydra.mode).endswith("MULTIRUN")


def read_sweep(sweep_dir: str) -> dict[str, Any] | None:
    path = Path(sweep_dir) / FILE
    return json.loads(path.read_text()) if path.exists() else None

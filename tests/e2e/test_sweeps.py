"""Sweeps: member cache, skipping finished jobs, interruption, parallel launchers, concurrent logging."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_config
from helpers import ROOT
from helpers.mlflow_cli import cli, client_for, running_mlflow_server

import runner.members
import runner.pipeline


def job_runs(uri: str, status: str | None = None):
    client, exp = client_for(uri)
    runs = client.search_runs([exp])
    return [r for r in runs if r.data.tags.get("role") == "job" and (status is None or r.info.status == status)]


def member_runs(uri: str):
    client, exp = client_for(uri)
    return client.search_runs([exp], "tags.role = 'member'")


def test_member_cache_hit_and_corrupt_entry_rebuilt(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runner.pipeline.run(compose_config([], tmp_path))
    # A different job (other eval settings) with the same member: the member comes from the cache.
    runner.pipeline.run(compose_config(["eval.ece_bins=10"], tmp_path))
    tags = sorted(r.data.tags["cache"] for r in member_runs(uri))
    assert tags == ["hit", "miss"]
    hit, miss = sorted(member_runs(uri), key=lambda r: r.data.tags["cache"])
    assert hit.data.metrics["train_s"] == miss.data.metrics["train_s"] > 0  # what training took, not the hit
    assert 0 < hit.data.metrics["cache_load_s"] and "cache_load_s" not in miss.data.metrics
    [entry] = (tmp_path / "cache" / "members").iterdir()
    (entry / "model.pt").write_bytes(b"truncated")
    runner.pipeline.run(compose_config(["eval.ece_bins=5"], tmp_path))
    assert "is corrupt" in caplog.text
    assert sorted(r.data.tags["cache"] for r in member_runs(uri)) == ["hit", "miss", "miss"]
    runner.pipeline.run(compose_config(["eval.ece_bins=6"], tmp_path))
    assert sorted(r.data.tags["cache"] for r in member_runs(uri)) == ["hit", "hit", "miss", "miss"]


def test_finished_jobs_are_skipped_failed_ones_rerun(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = runner.pipeline.run(compose_config(["seed=3"], tmp_path))
    shown = capsys.readouterr().out
    assert "member/cnn1d-s3" in shown
    again = runner.pipeline.run(compose_config(["seed=3"], tmp_path))
    assert capsys.readouterr().out == shown  # a skipped job shows the summary it printed when it ran
    common = set(first) & set(again)  # a skipped job returns what its run logged: the job-level metrics
    assert {"members/mean/test/acc", "members/best/test/nll", "objective/val_acc"} <= common
    assert {k: again[k] for k in common} == pytest.approx({k: first[k] for k in common})  # not a new run
    assert len(job_runs(uri)) == 1

    real = runner.members.train_classifier
    monkeypatch.setattr(runner.members, "train_classifier", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        runner.pipeline.run(compose_config(["seed=4"], tmp_path))
    monkeypatch.setattr(runner.members, "train_classifier", real)
    runner.pipeline.run(compose_config(["seed=4"], tmp_path))
    assert sorted(r.info.status for r in job_runs(uri)) == ["FAILED", "FINISHED", "FINISHED"]


def wait_for(path_glob: Path, pattern: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list(path_glob.glob(pattern)):
        assert time.time() < deadline, f"nothing matched {pattern} in {path_glob}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, "KILLED"), (signal.SIGKILL, "RUNNING")])
def test_killed_job_is_marked_and_resumes_from_checkpoint(sig, status, tmp_path):
    args = ("trainer.max_epochs=60", "data.num_samples=600", "model=mlp")
    job = cli(tmp_path, *args, background=True)
    wait_for(tmp_path / "cache", "checkpoints/*/last.ckpt")
    job.send_signal(sig)
    job.wait(timeout=60)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    [killed] = job_runs(uri)
    assert killed.info.status == status
    # Re-launch: the member resumes from its checkpoint, a SIGKILLed run is closed as FAILED.
    done = cli(tmp_path, *args)
    assert "resuming from checkpoint" in done.stdout + done.stderr
    statuses = {r.info.run_id: r.info.status for r in job_runs(uri)}
    assert statuses[killed.info.run_id] == ("KILLED" if sig == signal.SIGTERM else "FAILED")
    assert sorted(statuses.values()).count("FINISHED") == 1
    assert not list((tmp_path / "cache").glob("checkpoints/*/last.ckpt"))


@pytest.fixture
def mlflow_server(tmp_path):
    with running_mlflow_server(tmp_path / "server.db", "--artifacts-destination", str(tmp_path / "srv-art")) as uri:
        yield uri


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_parallel_jobs_lose_nothing(store, tmp_path, request):
    uri = request.getfixturevalue("mlflow_server") if store == "server" else f"sqlite:///{tmp_path}/mlflow.db"
    cli(
        tmp_path,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer=fast",
        "trainer.max_epochs=3",
        "data.num_samples=600",
        "seed=0,1,2,3",
        uri=uri,
    )
    client, exp = client_for(uri)
    jobs = job_runs(uri)
    assert sorted(r.data.params["seed"] for r in jobs) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in jobs)
    [sweep] = client.search_runs([exp], "tags.role = 'sweep'")
    assert sweep.info.status == "FINISHED"
    members = {r.data.tags["mlflow.parentRunId"]: r for r in member_runs(uri)}
    for r in jobs:
        assert r.data.tags["sweep_id"] == sweep.data.tags["sweep_id"]
        assert r.data.tags["mlflow.parentRunId"] == sweep.info.run_id
        member = members[r.info.run_id]
        assert len(client.get_metric_history(member.info.run_id, "train/loss")) == 3
        assert r.data.metrics["members/mean/test/f1"] == member.data.metrics["test/f1"]  # one column for all jobs
    assert len(members) == 4
    if store == "server":  # artifacts went to the server's store (proxied), none to this client's folder
        assert client.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
        assert list((tmp_path / "srv-art").rglob("test.npz")) and not list((tmp_path / "art").rglob("*"))


@pytest.mark.slow
def test_submitit_local_executor(tmp_path):
    cli(
        tmp_path,
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "trainer=fast",
        "data.num_samples=600",
        "seed=0,1",
    )
    jobs = job_runs(f"sqlite:///{tmp_path}/mlflow.db", "FINISHED")
    assert sorted(r.data.params["seed"] for r in jobs) == ["0", "1"]
    assert len({r.data.tags["sweep_id"] for r in jobs}) == 1


@pytest.mark.slow
def test_ray_launcher_on_a_local_ray_against_one_tracking_server(tmp_path, mlflow_server):
    """hydra/launcher=ray without a cluster: Ray starts on this machine, each job is a Ray task, and
    every job logs to the one tracking server (as conf/hydra/launcher/ray_cluster.yaml does on a cluster)."""
    cli(
        tmp_path,
        "-m",
        "hydra/launcher=ray",
        "+hydra.launcher.ray.init.num_cpus=2",
        "trainer=fast",
        "data.num_samples=600",
        "seed=0,1",
        uri=mlflow_server,
    )
    client, exp = client_for(mlflow_server)
    jobs = job_runs(mlflow_server, "FINISHED")
    assert sorted(r.data.params["seed"] for r in jobs) == ["0", "1"]
    [sweep] = client.search_runs([exp], "tags.role = 'sweep'")
    assert sweep.info.status == "FINISHED" and all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in jobs)
    assert list((tmp_path / "srv-art").rglob("test.npz"))  # artifacts in the server's store


@pytest.mark.parametrize(
    "launcher, expected",
    [
        (
            "slurm",
            {
                "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                "gpus_per_node": 1,
                "tasks_per_node": 1,
                "timeout_min": 120,
            },
        ),
        (
            "ray_cluster",
            {
                "_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
                "ray": {"init": {"address": "auto"}, "remote": {"num_gpus": 1, "num_cpus": 4}},
            },
        ),
    ],
)
def test_cluster_launcher_presets_build_their_plugins_launcher(launcher, expected):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    settings = OmegaConf.to_container(cfg.hydra.launcher)
    assert {k: settings[k] for k in expected} == expected
    get_class(settings["_target_"])  # the plugin is installed and its launcher class imports


@pytest.mark.slow
def test_optuna_sweep(tmp_path):
    cli(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.direction=maximize",
        "optim.lr=interval(0.001,0.05)",
        "trainer=fast",
        "data.num_samples=600",
    )
    jobs = job_runs(f"sqlite:///{tmp_path}/mlflow.db", "FINISHED")
    assert len(jobs) == 2 and len({r.data.params["optim.lr"] for r in jobs}) == 2
    assert "best_value" in (tmp_path / "sweep" / "optimization_results.yaml").read_text()


@pytest.mark.slow
def test_sweep_parent_run_ends_with_its_sweep_and_a_relaunch_nests_under_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny = ("-m", "trainer=fast", "data.num_samples=600")

    def sweeps():
        client, exp = client_for(uri)
        return {r.data.tags["overrides"]: r for r in client.search_runs([exp], "tags.role = 'sweep'")}

    cli(tmp_path, *tiny, "seed=0,1")
    [good] = sweeps().values()
    assert good.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in job_runs(uri)} == {good.info.run_id}
    # one job of this sweep fails (a bad value): its parent run ends FAILED, not RUNNING
    store = [
        f"tracking.uri={uri}",
        f"tracking.artifact_location={tmp_path}/art",
        f"data.cache_dir={tmp_path}/data",
        f"cache.dir={tmp_path}/cache",
        f"hydra.sweep.dir={tmp_path}/sweep2",
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "runner", *tiny, "data.val_fraction=0.1,1.5", *store],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "data.val_fraction" in bad.stderr
    assert sorted(r.info.status for r in sweeps().values()) == ["FAILED", "FINISHED"]
    # relaunching the first sweep: its jobs are skipped, under the same parent run, FINISHED again
    cli(tmp_path, *tiny, "seed=0,1")
    assert len(sweeps()) == 2 and len(job_runs(uri)) == 2  # (the failed sweep's good job was one of them)
    again = [r for r in sweeps().values() if r.info.run_id == good.info.run_id]
    assert again and again[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_server_that_dies_mid_run_ends_the_job_with_an_error_naming_tracking_uri(tmp_path, mlflow_server):
    job = cli(
        tmp_path, "trainer.max_epochs=400", "data.num_samples=600", "model=mlp", uri=mlflow_server, background=True
    )
    wait_for(tmp_path / "cache", "checkpoints/*/last.ckpt")  # training, with a run open on the server
    server_pid = int(
        subprocess.run(
            ["pgrep", "-f", "--", f"--port {mlflow_server.rsplit(':', 1)[1]}"], capture_output=True, text=True
        ).stdout.split()[0]
    )
    os.killpg(os.getpgid(server_pid), signal.SIGKILL)
    started = time.monotonic()
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and f"tracking.uri='{mlflow_server}'" in out
    assert time.monotonic() - started < 60

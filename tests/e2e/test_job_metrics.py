"""The job run's metrics are comparable across jobs (no member names in them), and every member run has
its learning curves, also when the member came from the cache."""

from __future__ import annotations

import statistics

import pytest
from conftest import compose_config
from mlflow import MlflowClient

import runner.pipeline


def job_and_members(uri: str, overrides: str) -> tuple:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("runner").experiment_id
    jobs = client.search_runs(
        [exp], f"tags.role = 'job' and tags.overrides = '{overrides}'", order_by=["attributes.start_time DESC"]
    )
    job = jobs[0]
    members = client.search_runs([exp], f"tags.role = 'member' and tags.`mlflow.parentRunId` = '{job.info.run_id}'")
    return client, job, sorted(members, key=lambda r: r.info.run_name)


@pytest.mark.slow
def test_jobs_share_metric_names_and_cached_members_keep_their_curves(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlp = ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]", "fuse=mean", "compress=prune_global"]
    cnn = ["model=cnn1d", "ensemble=seeds5", "ensemble.seeds=[3,4,5]", "fuse=mean", "compress=prune_global"]
    runner.pipeline.run(compose_config(mlp, tmp_path), overrides=mlp)
    runner.pipeline.run(compose_config(cnn, tmp_path), overrides=cnn)
    client, mlp_job, mlp_members = job_and_members(uri, " ".join(mlp))
    _, cnn_job, cnn_members = job_and_members(uri, " ".join(cnn))

    # the same keys in both jobs: two MLPs and three CNNs fill the same columns of MLflow's compare view
    keys = {k for k in mlp_job.data.metrics if not k.startswith("timing/")}
    assert keys == {k for k in cnn_job.data.metrics if not k.startswith("timing/")}
    assert not [k for k in keys if "mlp" in k or "cnn1d" in k]
    assert {
        "members/mean/test/acc",
        "members/std/test/acc",
        "members/best/test/acc",
        "members/best/test/nll",
        "fused/test/acc",
        "fused/gain/acc",
        "compressed/mean/test/acc",
        "compressed/mean/compression_ratio",
        "fused_compressed/test/acc",
        "objective/val_acc",
    } <= keys
    for job, members in ((mlp_job, mlp_members), (cnn_job, cnn_members)):
        accs = [m.data.metrics["test/acc"] for m in members]
        nlls = [m.data.metrics["test/nll"] for m in members]
        metrics = job.data.metrics
        assert metrics["members/n"] == len(members)
        assert metrics["members/mean/test/acc"] == pytest.approx(statistics.mean(accs))
        assert metrics["members/std/test/acc"] == pytest.approx(statistics.stdev(accs))
        assert metrics["members/best/test/acc"] == max(accs)
        assert metrics["members/best/test/nll"] == min(nlls)  # lower is better
        [fused] = client.search_runs(
            [job.info.experiment_id], f"tags.role = 'fused' and tags.`mlflow.parentRunId` = '{job.info.run_id}'"
        )
        assert metrics["fused/test/acc"] == fused.data.metrics["test/acc"]

    # learning curves in the member runs; a rerun takes the members from the cache and logs the same curves
    first = {
        m.info.run_name: [(h.step, h.value) for h in client.get_metric_history(m.info.run_id, "train/loss")]
        for m in mlp_members
    }
    epochs = compose_config(mlp, tmp_path).trainer.max_epochs
    assert all([s for s, _ in curve] == list(range(epochs)) for curve in first.values())
    again = [*mlp, "cache.skip_finished=false"]
    runner.pipeline.run(compose_config(again, tmp_path), overrides=mlp)
    _, _, cached = job_and_members(uri, " ".join(mlp))
    assert [m.data.tags["cache"] for m in cached] == ["hit", "hit"]
    assert {
        m.info.run_name: [(h.step, h.value) for h in client.get_metric_history(m.info.run_id, "train/loss")]
        for m in cached
    } == first

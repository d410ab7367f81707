"""trainer.strategy=ddp on the CPU (gloo, 2 processes): each rank trains on its own shard of in-memory
data, and the job goes on in one process: one MLflow job run, one evaluation, the curves of rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from mlflow import MlflowClient

import runner.data.base
import runner.pipeline
from runner.data.base import TensorBatches


def test_shuffled_batches_split_between_ranks(monkeypatch):
    x, y = torch.arange(11).float()[:, None], torch.arange(11)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(runner.data.base, "distributed_shard", lambda r=rank: (r, 2))
        batches = TensorBatches(x, y, batch_size=2, shuffle=True, seed=7)
        seen[rank] = torch.cat([b for _, b in batches]).tolist()
        assert len(batches) == 3 and len(seen[rank]) == 5  # 11 // 2 each, the same count on every rank
        # evaluation is not split
        assert torch.cat([b for _, b in TensorBatches(x, y, batch_size=4)]).tolist() == list(range(11))
    assert not set(seen[0]) & set(seen[1])
    monkeypatch.setattr(runner.data.base, "distributed_shard", lambda: (0, 1))
    whole = torch.cat([b for _, b in TensorBatches(x, y, batch_size=2, shuffle=True, seed=7)]).tolist()
    assert sorted(whole) == list(range(11)) and set(seen[0]) | set(seen[1]) <= set(whole)


class CountSamples(pl.Callback):
    """Writes how many training samples each rank saw (it runs in the spawned processes)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        from runner.batches import Chunk, split_batch

        n = sum(len(y) for _, y in batch) if isinstance(batch, Chunk) else len(split_batch(batch)[1])
        path = Path(self.folder) / f"rank{trainer.global_rank}.json"
        count = json.loads(path.read_text()) if path.exists() else 0
        path.write_text(json.dumps(count + n))


@pytest.mark.slow
def test_ddp_ranks_train_on_shards_and_the_job_runs_once(tmp_path, mnist1d_small):
    from runner.models import MLP
    from runner.train import train_classifier

    net = MLP(40, 10, hidden=16)
    before = [p.detach().clone() for p in net.parameters()]
    train_classifier(
        net,
        mnist1d_small,
        {"max_epochs": 2, "accelerator": "cpu", "devices": 2, "strategy": "ddp", "enable_progress_bar": False},
        {"name": "adam", "lr": 1e-2},
        callbacks=[CountSamples(str(tmp_path))],
    )
    n_train = len(mnist1d_small.splits["train"][1])
    counts = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert counts == {"rank0": 2 * (n_train // 2), "rank1": 2 * (n_train // 2)}  # half each, per epoch
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # rank 0's weights came back

    cfg = compose_config(
        ["model=mlp", "trainer=cpu", "trainer.max_epochs=2", "trainer.strategy=ddp", "trainer.devices=2"],
        tmp_path / "job",
    )
    results = runner.pipeline.run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/job/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert sorted((r.data.tags["role"], r.info.status) for r in runs) == [("job", "FINISHED"), ("member", "FINISHED")]
    [member] = [r for r in runs if r.data.tags["role"] == "member"]
    assert [m.step for m in client.get_metric_history(member.info.run_id, "train/loss")] == [0, 1]
    assert member.data.metrics["test/acc"] == results["members/mean/test/acc"]

"""Results you can trust: a result made by other code is never reused, divergence fails the run,
a damaged checkpoint is discarded."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
import torch
from conftest import compose_config
from helpers import ROOT
from sklearn.metrics import log_loss

from runner.cache import MemberCache, code_digest, source_digest
from runner.config import validate
from runner.errors import ConfigError, TrainingDiverged
from runner.evaluate import evaluate_model
from runner.fuse import HardVoting
from runner.pipeline import run

MODEL = textwrap.dedent("""
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, in_features, num_classes):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(in_features, 16), nn.{act}())
            self.classifier = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.classifier(self.body(x))
""")


def job_runs(tmp_path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("runner")
    return client.search_runs([experiment.experiment_id], "tags.role = 'job'")


def test_changed_user_code_is_neither_skipped_nor_served_from_the_cache(tmp_path, monkeypatch):
    (tmp_path / "user_tiny.py").write_text(MODEL.format(act="ReLU"))
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [
        "data=wine",
        "model._target_=user_tiny.Tiny",
        "~model.in_features",
        "~model.num_classes",
        "~model.channels",
        "+model.in_features=13",
        "+model.num_classes=3",
    ]
    first = run(compose_config(overrides, tmp_path))
    again = run(compose_config(overrides, tmp_path))  # same code: skipped, the same results
    common = set(first) & set(again)  # a skipped job returns its run's (job-level) metrics
    assert "members/mean/test/acc" in common and len(job_runs(tmp_path)) == 1
    assert {k: again[k] for k in common} == pytest.approx({k: first[k] for k in common})
    (tmp_path / "user_tiny.py").write_text(MODEL.format(act="Tanh"))  # the user edits the model
    run(compose_config(overrides, tmp_path))
    runs = job_runs(tmp_path)
    assert len(runs) == 2 and len({r.data.tags["job_hash"] for r in runs}) == 2
    assert len(list((tmp_path / "cache" / "members").iterdir())) == 2  # retrained, not loaded
    sys.modules.pop("user_tiny", None)


def test_code_digest_covers_user_modules_the_runner_and_libraries(tmp_path, monkeypatch):
    (tmp_path / "user_tiny.py").write_text(MODEL.format(act="ReLU"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_tiny

    before = code_digest([user_tiny.Tiny(4, 2)])
    assert set(before) == {"runner", "torch", "user_tiny"}
    (tmp_path / "user_tiny.py").write_text(MODEL.format(act="Tanh"))
    after = code_digest([user_tiny.Tiny(4, 2)])
    assert after["user_tiny"] != before["user_tiny"] and after["runner"] == before["runner"]
    sys.modules.pop("user_tiny", None)


def test_member_key_covers_training_code_only(tmp_path):
    """A change to compression / fusion code changes the job hash but keeps trained members."""
    for rel in ("models/net.py", "train.py", "fuse/mean.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    training, full = source_digest(tmp_path, ("models/net.py", "train.py")), source_digest(tmp_path)
    (tmp_path / "fuse/mean.py").write_text("x = 2\n")
    assert source_digest(tmp_path, ("models/net.py", "train.py")) == training and source_digest(tmp_path) != full
    (tmp_path / "models/net.py").write_text("x = 2\n")
    assert source_digest(tmp_path, ("models/net.py", "train.py")) != training
    assert code_digest([], training=True)["runner"] != code_digest([])["runner"]


def test_divergence_fails_the_run_naming_epoch_and_lr(tmp_path):
    cfg = compose_config(["optim.lr=1e9", "trainer.max_epochs=2", "trainer.limit_train_batches=null"], tmp_path)
    with pytest.raises(
        TrainingDiverged,
        match=r"^optim.lr=1000000000.0: training diverged, the mean (train|val) loss of "
        r"epoch 0 is nan \(optim.name=adam\); allowed: a smaller optim.lr",
    ):
        run(cfg)
    [job] = job_runs(tmp_path)
    assert job.info.status == "FAILED"
    with pytest.raises(TrainingDiverged):  # a relaunch is not skipped: it fails again
        run(cfg)


def test_a_truncated_checkpoint_is_discarded(tmp_path, caplog):
    cache = MemberCache(str(tmp_path))
    folder = tmp_path / "checkpoints" / "k"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    callback, resume_from = cache.checkpoint("k")
    assert resume_from is None and callback is not None and not (folder / "last.ckpt").exists()
    assert "unreadable" in caplog.text


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x):
        return self.logits[x.long().flatten()]


def test_nll_is_exact_and_equals_sklearn_log_loss():
    """A confident mistake (the true class ~1e-13 likely) once hit the 1e-12 floor: 27.6 instead of 30."""
    logits = torch.tensor([[0.0, 30.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 0, 2, 1])
    batches = [(torch.arange(4.0)[:, None], y)]
    metrics, probs, _, _ = evaluate_model(FixedLogits(logits), batches, 3, ["nll"])
    exact = float(-torch.log_softmax(logits.double(), 1)[torch.arange(4), y].mean())
    assert metrics["nll"] == pytest.approx(exact, rel=1e-12)
    assert metrics["nll"] == pytest.approx(log_loss(y.numpy(), probs.numpy(), labels=[0, 1, 2]), rel=1e-12)
    assert metrics["nll"] > 30 / 4  # the confident mistake counts in full


def test_hard_voting_nll_comes_from_smoothed_vote_shares():
    members = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]], dtype=torch.float64)  # votes 0, 0, 1
    vote = HardVoting().fit_outputs(members, torch.tensor([1]))
    p = vote.combine(members)
    # shares (2/3, 1/3) and one uniform pseudo-member of weight 1/3: (share + 1/6) / (4/3)
    assert torch.allclose(p, torch.tensor([[(2 / 3 + 1 / 6) * 0.75, (1 / 3 + 1 / 6) * 0.75]], dtype=torch.float64))
    assert vote.combine(members).argmax(1).item() == 0
    unanimous = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]]], dtype=torch.float64)
    raw = HardVoting(smoothing=0).fit_outputs(unanimous, torch.tensor([1])).combine(unanimous)
    assert raw[0, 1] == 0  # a wrong unanimous vote: probability 0, NLL infinite without smoothing


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.limit_train_batches=-2", "trainer.limit_train_batches"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.precision=8-mixed", "trainer.precision"),
        ("trainer.strategy=horovod", "trainer.strategy"),
        ("trainer=gpu", "trainer.accelerator"),  # no GPU on the machines that run the tests
        ("optim.momentum=-0.9", "optim.momentum"),
        ("tracking.experiment=''", "tracking.experiment"),
        ("seed=-1", "seed"),
        ("+foo=1", "foo"),
        ("data.split_seed=-5", "data.split_seed"),
        ("data.num_samples=10", "data.num_samples"),
        ("data.batch_size=big", "data.batch_size"),
        ("ensemble=seeds5 ensemble.seeds=[]", "ensemble.seeds"),
        ("cache.dir=/proc/no-such-dir", "cache.dir"),
        ("tracking.uri=bogus://x", "tracking.uri"),
        ("tracking.timeout_s=0", "tracking.timeout_s"),
    ],
)
def test_bad_values_fail_before_the_mlflow_run_opens(override, key, tmp_path):
    import torch

    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = compose_config(override.split(), tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
        run(cfg)
    assert e.value.key == key, str(e.value)
    assert not (tmp_path / "mlflow.db").exists() or not job_runs(tmp_path)


@contextlib.contextmanager
def silent_server():
    """A loopback port that accepts connections and never answers (a hung tracking server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def launch(tmp_path, *args: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "runner",
        "trainer=fast",
        "data.num_samples=600",
        f"cache.dir={tmp_path}/c",
        f"data.cache_dir={tmp_path}/d",
        f"hydra.run.dir={tmp_path}/run",
        *args,
    ]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_tracking_failures_end_the_job_with_an_error_naming_tracking_uri(tmp_path):
    started = time.monotonic()
    refused = launch(tmp_path, "tracking.uri=http://127.0.0.1:1")  # nothing listens there
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode != 0 and "tracking.uri='http://127.0.0.1:1'" in out
    assert "Traceback" not in out  # one line
    assert time.monotonic() - started < 30
    with silent_server() as uri:
        started = time.monotonic()
        hung = launch(tmp_path, f"tracking.uri={uri}", "tracking.timeout_s=5")
        # no hang: communicate raises after 120 s (MLflow's defaults would wait 120 s per request, 7 retries).
        # The job asks the store first after planning (imports and data: 25 s alone here, over 60 s under
        # the full suite's load on 2 cores), then 3 requests of 5 s and MLflow's backoff (~18 s).
        out, _ = hung.communicate(timeout=120)
        # the 5 s per request it was given, not the default 120 s: the message says what it waited
        assert hung.returncode != 0 and f"tracking.uri='{uri}'" in out and "within 5 s" in out


@pytest.mark.slow
def test_sigterm_ends_a_job_waiting_for_a_hung_store_within_10_s(tmp_path):
    with silent_server() as uri:
        job = launch(tmp_path, f"tracking.uri={uri}", "tracking.timeout_s=120")
        time.sleep(8)  # imports done, waiting for the store
        assert job.poll() is None
        started = time.monotonic()
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=30)
        assert time.monotonic() - started < 10


def test_probabilities_that_round_above_one_are_still_probabilities():
    """The mean of five float64 members can give 1.0000000000000002; ECE must not change for that."""
    from runner.evaluate import classification_metrics

    probs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    above = probs.clone()
    above[0, 0] = 1.0000000000000002
    assert above.max() > 1
    exact, rounded = (classification_metrics(p, y, 2, ["ece", "acc"], 15) for p in (probs, above))
    assert rounded == pytest.approx(exact) and exact["ece"] == pytest.approx(
        (0.0 + 0.1 + 0.2 + 0.6) / 4
    )  # the last is wrong at 0.6


def test_the_report_tool_names_an_unreachable_store_within_seconds(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.report",
            "tracking_uri=http://127.0.0.1:1",
            "experiment=x",
            f"out_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "tracking_uri='http://127.0.0.1:1': the MLflow store cannot be read" in done.stderr
    assert time.monotonic() - started < 30

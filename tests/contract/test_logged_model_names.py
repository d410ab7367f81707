"""The LoggedModels of the default path (tracking.log_models on): named by role and
member, carrying their child run's final test metrics and the job's source, a cached member logged
once, and text models logged with a signature of both token tensors."""

import numpy as np
import pytest
import torch
from conftest import compose_config, logged_predictions
from mlflow import MlflowClient

import runner
import runner.pipeline
from runner.tracking.models import CACHE_ENTRY_TAG, MODEL_URI_TAG, using_tracking_uri

DEFAULT_PATH = ["tracking.log_models=true"]
TWO_MLPS = ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for this module's jobs, so they share one MLflow worker (its imports and the new
    store's tables take most of a first job's time)."""
    return tmp_path_factory.mktemp("store")


def run_job(store, overrides: list[str], choices: dict[str, str] | None = None) -> tuple[MlflowClient, str, list]:
    """Run one job as the command line would; (client, experiment id, the job's child runs in order)."""
    runner.pipeline.run(compose_config([*overrides, *DEFAULT_PATH], store), overrides, choices=choices)
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("runner").experiment_id
    job = client.search_runs([exp], "tags.role = 'job'", order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{job.info.run_id}'", order_by=["attributes.start_time ASC"]
    )
    return client, exp, list(children)


@pytest.mark.slow
def test_models_are_named_by_role_carry_final_test_metrics_and_a_cached_member_is_logged_once(store):
    # job 1 trains both members (2 epochs: a first epoch and a final one); job 2, another fusion, loads
    # them from the member cache
    mlps = [*TWO_MLPS, "trainer.max_epochs=2"]
    _, _, job1 = run_job(store, [*mlps, "fuse=mean", "compress=quant_dynamic"], {"choice/fuse": "mean"})
    client, exp, job2 = run_job(store, [*mlps, "fuse=soft_vote"], {"choice/fuse": "soft_vote"})
    runs = job1 + job2
    uri = f"sqlite:///{store}/mlflow.db"
    models = [m for m in client.search_logged_models([exp]) if m.source_run_id in {r.info.run_id for r in runs}]
    assert sorted(m.name for m in models) == sorted(
        [
            "member-mlp-s0",
            "member-mlp-s1",
            "fused-mean",
            "compressed-mlp-s0",
            "compressed-mlp-s1",
            "fused_compressed-mean",
            "fused-soft_vote",
        ]
    )  # each cached member once, not once per job

    # every model: its run's final evaluation as its metrics, none of the learning curves' epochs
    for model in models:
        run = client.get_run(model.source_run_id)
        linked = {m.key: m.value for m in model.metrics or []}
        assert len(linked) == len(model.metrics or []), f"{model.name}: a metric linked twice"
        curves = {k for k in run.data.metrics if k.startswith(("train/", "val/"))}
        assert linked == {k: v for k, v in run.data.metrics.items() if k not in curves}, model.name
        assert {"test/acc", "test/nll", "latency_ms"} <= set(linked)
        if model.name.startswith("member"):  # the curves are in the run, not in the model
            assert {"val/acc", "train/loss"} <= curves and not curves & set(linked), model.name
        # the job's command as its source (of the model and its run), not the MLflow worker's script
        assert model.tags["mlflow.source.name"] == run.data.tags["mlflow.source.name"] == "python -m runner"
        assert run.data.tags[MODEL_URI_TAG] == f"models:/{model.model_id}"

    # both jobs' runs of a cached member point at the one model; it loads from either run
    for member in ("mlp-s0", "mlp-s1"):
        first, second = [r for r in runs if r.data.tags.get("member") == member and r.data.tags["role"] == "member"]
        assert (first.data.tags["cache"], second.data.tags["cache"]) == ("miss", "hit")
        assert first.data.tags[CACHE_ENTRY_TAG] == second.data.tags[CACHE_ENTRY_TAG]
        assert first.data.tags[MODEL_URI_TAG] == second.data.tags[MODEL_URI_TAG]
        [model] = [m for m in models if m.name == f"member-{member}"]
        assert model.tags[CACHE_ENTRY_TAG] == first.data.tags[CACHE_ENTRY_TAG]
        assert model.source_run_id == first.info.run_id  # its metrics stay the first run's
        loaded = runner.load(second.info.run_id, tracking_uri=uri)
        assert loaded.model_uri == second.data.tags[MODEL_URI_TAG]
        probs, _ = logged_predictions(store, second)
        np.testing.assert_allclose(
            loaded.predict_proba(torch.as_tensor(loaded.input_example)).numpy(), probs[:5], rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow
def test_a_text_model_gets_a_signature_of_both_token_tensors(store, tmp_path):
    rows = [f"a {w} film" for w in ("great", "fine", "dull", "bad") for _ in range(30)]
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{t},{int(t[2] in 'gf')}\n" for t in rows))
    _, _, [member] = run_job(
        store, ["model=text_bow", "data=text", f"data.path={tmp_path}/t.csv", "data.max_length=16"]
    )
    uri, model_uri = f"sqlite:///{store}/mlflow.db", member.data.tags[MODEL_URI_TAG]
    from mlflow.models import get_model_info

    with using_tracking_uri(uri):
        info = get_model_info(model_uri)
    assert [(s.name, s.type, s.shape) for s in info.signature.inputs.inputs] == [
        ("input_ids", np.dtype("int64"), (-1, 16)),
        ("attention_mask", np.dtype("int64"), (-1, 16)),
    ]
    assert [(s.type, s.shape) for s in info.signature.outputs.inputs] == [(np.dtype("float32"), (-1, 2))]
    # MLflow keeps no input example of its own: it would check it through its PyTorch pyfunc, which takes
    # no dict ("Got error: The PyTorch flavor does not support List or Dict input types"); the token
    # example travels beside the model instead
    assert info.saved_input_example_info is None
    example = runner.load(model_uri, tracking_uri=uri).input_example
    assert {k: (v.shape, v.dtype) for k, v in example.items()} == {
        "input_ids": ((5, 16), np.dtype("int64")),
        "attention_mask": ((5, 16), np.dtype("int64")),
    }


def test_names_are_what_mlflow_takes():
    from runner.tracking.models import logged_model_name

    assert logged_model_name("member", "cnn1d-s0") == "member-cnn1d-s0"
    assert logged_model_name("fused_compressed", "mean") == "fused_compressed-mean"
    assert logged_model_name("member", "my.net/v1:2-s0") == "member-my_net_v1_2-s0"  # MLflow refuses . / : % ' "
    assert logged_model_name("fused", "") == "fused"

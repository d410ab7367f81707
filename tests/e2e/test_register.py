"""runner.register: the best logged model by a metric becomes a registered version under an alias."""

import mlflow
import pytest
import torch
from conftest import compose_config
from mlflow import MlflowClient

import runner
import runner.pipeline
from runner.errors import ConfigError
from runner.register import main, register_best
from runner.tracking.models import MODEL_URI_TAG


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A tiny job with two MLP members fused by their mean, every model logged; its tracking URI."""
    tmp = tmp_path_factory.mktemp("register")
    runner.pipeline.run(
        compose_config(
            ["model=mlp", "ensemble=seeds5", "ensemble.seeds=[0,1]", "fuse=mean", "tracking.log_models=true"], tmp
        )
    )
    return f"sqlite:///{tmp}/mlflow.db"


def best_run(uri: str, metric: str, higher: bool, role: str | None = None):
    """The best child run by hand: over the logged metrics, the earliest run wins a tie."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("runner").experiment_id
    runs = sorted(
        (
            r
            for r in client.search_runs([exp])
            if r.data.tags.get("role") not in ("job", None) and (role is None or r.data.tags["role"] == role)
        ),
        key=lambda r: r.info.start_time,
    )
    best = runs[0]
    for r in runs[1:]:
        value, top = r.data.metrics[metric], best.data.metrics[metric]
        if (value > top) if higher else (value < top):
            best = r
    return best


@pytest.mark.slow
def test_best_by_accuracy_any_role_loads_by_alias(store):
    expected = best_run(store, "test/acc", higher=True)
    assert len(MlflowClient(store).search_runs([expected.info.experiment_id])) == 4  # job, 2 members, fused
    version, run_id, value = register_best(store, "runner", "test/acc", "mnist1d-mlp")
    assert (run_id, value) == (expected.info.run_id, expected.data.metrics["test/acc"])

    client = MlflowClient(store)
    found = client.get_model_version_by_alias("mnist1d-mlp", "champion")
    model_id = expected.data.tags[MODEL_URI_TAG].removeprefix("models:/")
    assert (found.version, found.run_id, found.source) == (1, expected.info.run_id, f"models:/{model_id}")
    assert client.get_logged_model(model_id).source_run_id == expected.info.run_id
    assert found.tags == {
        "run_id": expected.info.run_id,
        "metric": "test/acc",
        "mode": "max",
        "metric_value": repr(value),
        "role": expected.data.tags["role"],
        **({"member": expected.data.tags["member"]} if "member" in expected.data.tags else {}),
    }

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        by_alias = mlflow.pytorch.load_model("models:/mnist1d-mlp@champion", map_location="cpu").eval()
    finally:
        mlflow.set_tracking_uri(before)
    logged = runner.load(expected.info.run_id, tracking_uri=store)
    x = torch.as_tensor(logged.input_example)
    with torch.no_grad():
        torch.testing.assert_close(by_alias(x), logged.model(x), rtol=0, atol=0)
    # runner.load (and so runner.predict) takes the registry's names too
    for ref in ("models:/mnist1d-mlp@champion", "models:/mnist1d-mlp/1"):
        shipped = runner.load(ref, tracking_uri=store)
        assert (shipped.model_uri, shipped.run_id) == (f"models:/{model_id}", expected.info.run_id)
        torch.testing.assert_close(shipped.predict_proba(x), logged.predict_proba(x), rtol=0, atol=0)


@pytest.mark.slow
def test_command_line_lowest_nll_among_members_moves_its_alias(store, capsys):
    expected = best_run(store, "test/nll", higher=False, role="member")
    args = [
        "experiment=runner",
        "metric=test/nll",
        "mode=min",
        "role=member",
        "name=mnist1d-member",
        "alias=best-nll",
        f"tracking_uri={store}",
    ]
    main(args)
    main(args)  # a second registration: a new version, the alias follows it
    found = MlflowClient(store).get_model_version_by_alias("mnist1d-member", "best-nll")
    assert (found.version, found.run_id, found.tags["role"]) == (2, expected.info.run_id, "member")
    lines = capsys.readouterr().out.splitlines()
    value = expected.data.metrics["test/nll"]
    assert lines == [
        f"registered mnist1d-member version {v} as @best-nll: run {expected.info.run_id}, test/nll={value:.6g} (min)"
        for v in (1, 2)
    ]


def test_errors_name_the_key_and_what_there_is(tmp_path):
    from runner.tracking.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "runner", str(tmp_path / "art"))
    job = tracker.start_run("job", tags={"role": "job"})
    tracker.log_child(job, "member/a", {}, {"role": "member"}, {"test/acc": 0.5})  # logged no model
    with pytest.raises(ConfigError, match=r"experiment='runner'.*tracking\.log_models"):
        register_best(uri, "runner", "test/acc", "m")
    with pytest.raises(ConfigError, match=r"experiment='nope'.*\['Default', 'runner'\]"):
        register_best(uri, "nope", "test/acc", "m")
    with pytest.raises(ConfigError, match=r"mode='high'.*\['max', 'min'\]"):
        register_best(uri, "runner", "test/acc", "m", mode="high")

    # runs that point at a model (selection only: no model is loaded before a run is chosen)
    tracker.log_child(
        job,
        "member/b",
        {},
        {"role": "member", MODEL_URI_TAG: "models:/m-b", "sweep_id": "s1"},
        {"test/acc": 0.5, "test/nll": 1.0},
    )
    with pytest.raises(ConfigError, match=r"metric='test/f1'.*\['test/acc', 'test/nll'\]"):
        register_best(uri, "runner", "test/f1", "m")
    with pytest.raises(ConfigError, match=r"role='fused'.*\['member'\]"):
        register_best(uri, "runner", "test/acc", "m", role="fused")
    with pytest.raises(ConfigError, match=r"sweep='s2'.*\['s1'\]"):
        register_best(uri, "runner", "test/acc", "m", sweep="s2")
    with pytest.raises(SystemExit) as e:
        main(["experiment=runner", "metric=test/acc", "name=m", "colour=red", f"tracking_uri={uri}"])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match=r"tracking_uri=.*an existing MLflow store"):
        register_best(f"sqlite:///{tmp_path}/none.db", "runner", "test/acc", "m")
    assert not (tmp_path / "none.db").exists()
    assert MlflowClient(uri).search_registered_models() == []


def test_models_of_different_data_are_not_mixed_and_data_narrows(tmp_path):
    from runner.tracking.mlflow_tracker import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "runner", str(tmp_path / "art"))
    job = tracker.start_run("job", tags={"role": "job"})
    for name, data, acc in (("a", "wine", 0.9), ("b", "mnist1d", 0.7), ("c", "wine", 0.8)):
        tracker.log_child(
            job,
            f"member/{name}",
            {"choice/data": data, "choice/model": "mlp"},
            {"role": "member", MODEL_URI_TAG: f"models:/m-{name}"},
            {"val/acc": acc},
        )
    with pytest.raises(
        ConfigError,
        match=r"^Invalid config: data=None; allowed: one dataset per registered model: "
        r"the selection holds models of 2 \(mnist1d, wine\)",
    ):
        register_best(uri, "runner", "val/acc", "m")
    with pytest.raises(
        ConfigError, match=r"data='cifar10'; allowed: a value the selected runs have: \['mnist1d', 'wine'\]"
    ):
        register_best(uri, "runner", "val/acc", "m", where={"choice/data": "cifar10"})
    # narrowed to one dataset, the selection gets as far as the best run's model (a fake id here)
    with pytest.raises(Exception, match="m-a"):
        register_best(uri, "runner", "val/acc", "m", where={"choice/data": "wine"})


@pytest.mark.slow
def test_selection_is_on_validation_by_default_and_a_test_metric_warns(store, capsys):
    expected = best_run(store, "val/acc", higher=True, role="member")  # members log val/acc as they train
    main(["experiment=runner", "name=by-val", f"tracking_uri={store}"])
    out, err = capsys.readouterr()
    assert f"run {expected.info.run_id}, val/acc=" in out and "warning" not in err
    main(["experiment=runner", "name=by-test", "metric=test/acc", f"tracking_uri={store}"])
    assert (
        "register: warning: selecting on test/acc picks the model that did best on the test set"
        in capsys.readouterr().err
    )

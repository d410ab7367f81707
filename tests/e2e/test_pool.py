"""A pool of tasks (runner/pool.py) end to end on tiny tables: one start, one fine-tune per task with its
own head, the backbones merged, every task evaluated with its head, logged to MLflow; shared rows dropped
from training, bad pools refused before training."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config, logged_predictions
from mlflow import MlflowClient
from sklearn.preprocessing import StandardScaler

import runner
from runner.config import build
from runner.data import as_source
from runner.errors import ConfigError
from runner.fuse.multitask import backbone_keys
from runner.members import member_key
from runner.pipeline import run
from runner.pool import plan_pool


def write_tables(folder):
    """a.csv: labels a (2 classes) and c (3 classes) of one set of rows; b.csv: label b (2) of other rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(480, 6)).round(4)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    first, second = frame.iloc[:240].copy(), frame.iloc[240:].copy()
    first["a"] = (first.f0 + first.f1 > 0).astype(int)
    first["c"] = np.digitize(first.f2 - first.f3, [-0.5, 0.5])
    second["b"] = (second.f4 > second.f5).astype(int)
    first.to_csv(folder / "a.csv", index=False)
    second.to_csv(folder / "b.csv", index=False)


def pool(tmp_path, *extra):
    write_tables(tmp_path)
    tasks = []
    for name, file, label in (("a", "a.csv", "a"), ("b", "b.csv", "b"), ("c", "a.csv", "c")):
        tasks += [f"+data@tasks.{name}.data=table", f"tasks.{name}.data.path={tmp_path / file}"]
        tasks += [f"tasks.{name}.data.label={label}", f"tasks.{name}.data.batch_size=32"]
        tasks += [f"tasks.{name}.data.features=[f0,f1,f2,f3,f4,f5]"]
    return compose_config(["model=mlp_small", "trainer.max_epochs=3", "optim.lr=0.01", *tasks, *extra], tmp_path)


def rows(x):
    return {tuple(np.round(r, 4)) for r in np.asarray(x)}


def raw_splits(cfg):
    """The task's splits built alone, outside the pool, before scaling (data.scaling=none)."""
    cfg = cfg.copy()
    cfg.scaling = "none"
    dm = as_source(build(cfg, "data"))
    dm.setup()
    return {s: dm.splits[s][0].numpy() for s in ("train", "val", "test")}


def all_runs(tmp_path) -> list:
    """Every run of the job's MLflow experiment (tmp_path's store)."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("runner").experiment_id])


def child_runs(tmp_path) -> dict:
    """The job's child runs by name (member/a, fused/a, ...)."""
    return {r.info.run_name: r for r in all_runs(tmp_path) if r.data.tags.get("role") != "job"}


def logged_inputs(cfg, task):
    """Task `task`'s test inputs in loader order, as its job saw them (scaled by its own training split)."""
    dm = as_source(build(cfg.tasks[task].data, "data"))
    dm.setup()
    return dm.splits["test"][0]


def test_task_arithmetic_pool_end_to_end(tmp_path):
    cfg = pool(tmp_path, "merge=task_arithmetic", "merge.scaling=0.5")
    start = plan_pool(cfg).start
    results = run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = child_runs(tmp_path)
    assert set(runs) == {f"{role}/{t}" for role in ("member", "fused") for t in "abc"}
    members = {t: runner.load(runs[f"member/{t}"].info.run_id, tracking_uri=uri).model for t in "abc"}
    keys = backbone_keys(members["a"])
    for t in "abc":
        # the logged metrics are those of the logged predictions, per task, on that task's test split
        for role in ("member", "fused"):
            probs, targets = logged_predictions(tmp_path, runs[f"{role}/{t}"])
            assert results[f"{role}/{t}/test/acc"] == pytest.approx((probs.argmax(1) == targets).mean())
        # the merged model: theta_0 + 0.5 * sum of the task vectors on the backbone, the task's own head
        fused = runner.load(runs[f"fused/{t}"].info.run_id, tracking_uri=uri).model.state_dict()
        own = members[t].state_dict()
        for k in own:
            if k in keys:
                expected = start[k] + 0.5 * sum(members[s].state_dict()[k] - start[k] for s in "abc")
            else:
                expected = own[k]
            torch.testing.assert_close(fused[k], expected, rtol=1e-5, atol=1e-6)
        assert results[f"fused/{t}/normalized_acc"] == pytest.approx(
            results[f"fused/{t}/test/acc"] / results[f"member/{t}/test/acc"]
        )
    job = next(r for r in all_runs(tmp_path) if r.data.tags.get("role") == "job")
    logged = job.data.metrics
    assert logged["fused/mean/test/acc"] == pytest.approx(np.mean([results[f"fused/{t}/test/acc"] for t in "abc"]))
    assert logged["members/mean/test/acc"] == pytest.approx(np.mean([results[f"member/{t}/test/acc"] for t in "abc"]))
    assert logged["fused/scaling"] == 0.5 and logged["fused/merge_s"] > 0
    assert "choice/data" not in job.data.params and "tasks.c.data.label" in job.data.params


def test_training_rows_that_are_another_tasks_held_out_rows_are_dropped(tmp_path):
    cfg = pool(tmp_path)
    job = plan_pool(cfg)
    by_name = {t.name: t for t in job.tasks}
    raw = {t: raw_splits(cfg.tasks[t].data) for t in "abc"}
    for t in "abc":
        others = set().union(*(rows(raw[s]["val"]) | rows(raw[s]["test"]) for s in "abc" if s != t))
        train = raw[t]["train"]
        kept = np.array([tuple(np.round(r, 4)) not in others for r in train])
        # what the task trains on: its own training rows less the others' held-out ones, scaled as before
        scaler = StandardScaler().fit(train)
        expected = scaler.transform(train[kept]).astype(np.float32)
        np.testing.assert_allclose(by_name[t].datamodule.splits["train"][0].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert by_name[t].dropped == int((~kept).sum())
    assert by_name["b"].dropped == 0 and by_name["a"].dropped > 10 and by_name["c"].dropped > 10
    assert by_name["a"].member.data["dropped_shared_rows"].startswith(f"{by_name['a'].dropped}:")
    a = by_name["a"]  # which rows were dropped is part of the member's cache key
    key = member_key(a.member, a.datamodule, job.cfg.trainer, job.cfg.optim, a.cfg.data)
    a.member.data = {}
    assert member_key(a.member, a.datamodule, job.cfg.trainer, job.cfg.optim, a.cfg.data) != key


def test_rerun_with_another_method_reuses_the_fine_tunes(tmp_path):
    first = run(pool(tmp_path, "merge=average"))
    second = run(pool(tmp_path, "merge=ties", "merge.scaling=0.5"))
    for t in "abc":
        assert second[f"member/{t}/test/acc"] == first[f"member/{t}/test/acc"]
    runs = all_runs(tmp_path)
    hits = [r.data.tags.get("cache") for r in runs if r.info.run_name.startswith("member/")]
    assert sorted(hits) == ["hit"] * 3 + ["miss"] * 3


def test_a_task_can_start_from_its_fine_tuned_checkpoint(tmp_path):
    cfg = pool(tmp_path)
    job = plan_pool(cfg)
    net = job.tasks[1].member.net
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    torch.save(net.state_dict(), tmp_path / "b.pt")
    results = run(pool(tmp_path, f"+tasks.b.checkpoint={tmp_path / 'b.pt'}"))
    runs = all_runs(tmp_path)
    member = next(r for r in runs if r.info.run_name == "member/b")
    assert member.data.tags["source"] == "checkpoint"
    loaded = runner.load(member.info.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").model
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert "member/b/test/acc" in results


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["fuse=mean"], "fuse"),
        (["+tasks.zzz.data.path=x.csv"], "tasks.zzz"),
        (["tasks.b.data.features=[f0,f1,f2]"], "tasks (backbone)"),
        (["+tasks.b.checkpoint=WRONG"], "tasks.b.checkpoint"),
        (["+tasks.b.epochs=3"], "tasks.b.epochs"),
    ],
)
def test_bad_pools_are_refused_before_training(tmp_path, extra, key):
    if "WRONG" in extra[0]:
        torch.save({"body.0.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
        extra = [extra[0].replace("WRONG", str(tmp_path / "wrong.pt"))]
    with pytest.raises(ConfigError) as caught:
        run(pool(tmp_path, *extra))
    assert caught.value.key == key
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt"))


def test_multitask_training_trains_one_backbone_with_a_head_per_task(tmp_path):
    results = run(pool(tmp_path, "merge=multitask"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = child_runs(tmp_path)
    nets = {t: runner.load(runs[f"fused/{t}"].info.run_id, tracking_uri=uri).model for t in "abc"}
    keys = backbone_keys(nets["a"])
    start = plan_pool(pool(tmp_path)).start
    for t in "bc":  # one backbone for every task, moved away from the start; each task its own head
        for k in keys:
            torch.testing.assert_close(nets[t].state_dict()[k], nets["a"].state_dict()[k])
    assert not torch.equal(nets["a"].state_dict()[keys[0]], start[keys[0]])
    assert nets["c"].head.weight.shape[0] == 3 and nets["a"].head.weight.shape[0] == 2
    for t in "abc":
        probs, targets = logged_predictions(tmp_path, runs[f"fused/{t}"])
        assert results[f"fused/{t}/test/acc"] == pytest.approx((probs.argmax(1) == targets).mean())


def test_merge_and_int8_in_both_orders(tmp_path):
    cfg = pool(tmp_path, "merge=task_arithmetic", "merge.scaling=0.5", "compress=quant_dynamic")
    start = plan_pool(cfg).start
    results = run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = child_runs(tmp_path)
    assert set(runs) == {
        f"{role}/{t}"
        for role in ("member", "fused", "compressed", "compressed_fused", "fused_compressed")
        for t in "abc"
    }
    load = lambda name: runner.load(runs[name].info.run_id, tracking_uri=uri).model  # noqa: E731
    # compress, then merge: the int8 members' dequantized weights merged as task arithmetic does
    int8 = {t: load(f"compressed/{t}") for t in "abc"}
    deq = {
        t: {
            f"{n}.weight": m.weight().dequantize()
            for n, m in int8[t].named_modules()
            if callable(getattr(m, "weight", None))
        }
        for t in "abc"
    }
    for t in "abc":
        merged = load(f"fused_compressed/{t}").state_dict()
        for k in deq[t]:
            if k.startswith("body."):
                expected = start[k] + 0.5 * sum(deq[s][k] - start[k] for s in "abc")
                torch.testing.assert_close(merged[k], expected, rtol=1e-5, atol=1e-6)
        # merge, then compress: the merged model through torch's own dynamic int8 quantization
        fused = load(f"fused/{t}")
        reference = torch.ao.quantization.quantize_dynamic(fused, {torch.nn.Linear}, dtype=torch.qint8)
        probs, targets = logged_predictions(tmp_path, runs[f"compressed_fused/{t}"])
        x = torch.as_tensor(logged_inputs(cfg, t))
        np.testing.assert_allclose(torch.softmax(reference(x).double(), 1).numpy(), probs, rtol=1e-5, atol=1e-6)
        assert results[f"compressed_fused/{t}/delta/acc"] == pytest.approx(
            results[f"compressed_fused/{t}/test/acc"] - results[f"fused/{t}/test/acc"]
        )


def test_a_backbone_only_checkpoint_gets_its_head_fitted_on_frozen_features(tmp_path):
    job = plan_pool(pool(tmp_path))
    net = job.tasks[1].member.net
    with torch.no_grad():
        for p in net.body.parameters():
            p.add_(0.05)
    backbone = {k: v for k, v in net.state_dict().items() if k.startswith("body.")}
    torch.save(backbone, tmp_path / "b_backbone.pt")
    run(pool(tmp_path, f"+tasks.b.checkpoint={tmp_path / 'b_backbone.pt'}"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = all_runs(tmp_path)
    member = next(r for r in runs if r.info.run_name == "member/b")
    assert member.data.tags["source"] == "checkpoint backbone"
    loaded = runner.load(member.info.run_id, tracking_uri=uri).model.state_dict()
    for k, v in backbone.items():  # the backbone is the checkpoint's, frozen; the head trained
        torch.testing.assert_close(loaded[k], v)
    assert not torch.equal(loaded["head.weight"], job.tasks[1].initial["head.weight"])


def test_distilling_each_tasks_merged_model_into_a_student_of_its_classes(tmp_path):
    cfg = pool(tmp_path, "merge=average", "compress=distill", "compress.steps.0.epochs=1", "compress.steps.0.mixup=0")
    results = run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = child_runs(tmp_path)
    for t, classes in (("a", 2), ("b", 2), ("c", 3)):
        for role in ("compressed", "compressed_fused"):
            student = runner.load(runs[f"{role}/{t}"].info.run_id, tracking_uri=uri).model
            assert student.head.out_features == classes and student.body[0].out_features == 64  # mlp_small
    # students are another architecture: their weights cannot be merged, and the job says so
    assert results["fused_compressed/skipped"] == 1.0 and not any(k.startswith("fused_compressed/a") for k in results)


def test_weight_only_int8_members_merged_from_the_weights_they_multiply_by(tmp_path):
    cfg = pool(tmp_path, "merge=task_arithmetic", "merge.scaling=0.5", "compress=quant_int8_weight", "model.hidden=64")
    start = plan_pool(cfg).start
    run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = child_runs(tmp_path)
    load = lambda name: runner.load(runs[name].info.run_id, tracking_uri=uri).model  # noqa: E731
    # each int8 layer's weight, read back through its own matmul on the identity (not torchao's dequantize)
    eye = torch.eye(64)
    int8 = {t: load(f"compressed/{t}") for t in "abc"}
    weights = {t: {"body.2.weight": torch.nn.functional.linear(eye, int8[t].body[2].weight).T} for t in "abc"}
    for t in "abc":
        merged = load(f"fused_compressed/{t}").state_dict()
        k = "body.2.weight"
        expected = start[k] + 0.5 * sum(weights[s][k] - start[k] for s in "abc")
        torch.testing.assert_close(merged[k], expected, rtol=1e-4, atol=1e-5)
        assert not torch.equal(merged[k], load(f"fused/{t}").state_dict()[k])  # not the float members' merge

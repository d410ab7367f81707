"""Distillation from several teachers at once and from intermediate features (FitNets)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import SPEC, compose_config
from mlflow import MlflowClient
from torch import nn

import runner.members
import runner.pipeline
from runner.batches import DataSpec
from runner.compress import CompressContext, Distill, Recipe, build_recipe
from runner.compress.distill import DistillModule
from runner.compress.feature_taps import FeaturePair, FeatureProjection, FeatureShape, feature_loss, probe_features
from runner.errors import ConfigError
from runner.models import CNN1D, GRU, MLP, LeNet5, ResNetCIFAR
from runner.models.adapter import build_model

TINY_TRAINER = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
OPTIM = {"name": "adam", "lr": 1e-2}


def recipe(name: str, *overrides: str) -> Recipe:
    return build_recipe(compose_config([f"compress={name}", *overrides]).compress)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def hooks_left(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def hand_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * mean over the batch of sum_c p_c (log p_c - log q_c), tempered softmaxes written out."""
    teacher_logits, student_logits = teacher_logits.double(), student_logits.double()
    p = torch.exp(teacher_logits / t) / torch.exp(teacher_logits / t).sum(1, keepdim=True)
    q = torch.exp(student_logits / t) / torch.exp(student_logits / t).sum(1, keepdim=True)
    return (p * (p.log() - q.log())).sum(1).mean() * t**2


class Refuses(nn.Module):
    """A teacher that must not be run (its weight is 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a teacher of weight 0 was run")


# --- multi-teacher ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, expected", [(None, [1 / 3, 1 / 3, 1 / 3]), ([2, 1, 1], [0.5, 0.25, 0.25])])
def test_multi_teacher_loss_is_the_weighted_sum_of_kls(weights, expected):
    torch.manual_seed(0)
    net, teachers = MLP(40, 10, hidden=8), [MLP(40, 10, hidden=8) for _ in range(3)]
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    module = DistillModule(net, teacher=teachers, temperature=2.0, alpha=0.7, teacher_weights=weights)
    logits = net(x)
    with torch.no_grad():
        kls = [hand_kl(logits, t(x), 2.0) for t in teachers]
    ce = -F.log_softmax(logits, 1)[torch.arange(16), y].mean()
    hand = 0.7 * sum(w * kl for w, kl in zip(expected, kls)) + 0.3 * ce
    assert module.loss(logits, y, x).item() == pytest.approx(hand.item(), rel=1e-5)
    assert len({round(float(kl), 6) for kl in kls}) == 3  # three different teachers, so weights matter


def test_a_teacher_of_weight_zero_is_not_run():
    torch.manual_seed(0)
    net, teacher = MLP(40, 10, hidden=8), MLP(40, 10, hidden=8)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    module = DistillModule(net, teacher=[teacher, Refuses()], temperature=3.0, alpha=1.0, teacher_weights=[5, 0])
    logits = net(x)
    assert module.loss(logits, y, x).item() == pytest.approx(hand_kl(logits, teacher(x), 3.0).item(), rel=1e-5)


def test_members_teacher_uses_the_jobs_members(mnist1d_small):
    """teacher: members reads ctx.members in member order (the second, of weight 0, is never run); without
    ctx.members, or with a single member, the teacher is the member itself."""
    torch.manual_seed(0)
    member, other = MLP(40, 10, hidden=8), MLP(40, 10, hidden=8)
    step = Recipe([Distill(student=MLP(40, 10, hidden=4), teacher="members", teacher_weights=[1, 0], epochs=1)])
    ctx = CompressContext(mnist1d_small, TINY_TRAINER, OPTIM, teacher=member, members=[other, Refuses()])
    assert step.steps[0].teachers(member, ctx) == [other, ctx.members[1]]
    step.apply(member, ctx)  # Refuses would raise if it were run
    uniform = Distill(student=MLP(40, 10, hidden=4), teacher="members")
    assert uniform.teachers(member, CompressContext(mnist1d_small, {}, {})) == [member]
    assert uniform.teachers(member, CompressContext(mnist1d_small, {}, {}, members=[other])) == [other]


@pytest.mark.parametrize(
    "weights, allowed",
    [
        ("[1,-1]", "non-negative"),
        ("[0,0]", "not all zero"),
        ("[1,abc]", "a list of numbers"),
        ("[]", "a list"),
    ],
)
def test_bad_teacher_weights_fail_when_the_recipe_is_built(weights, allowed):
    with pytest.raises(ConfigError, match=allowed) as e:
        recipe("distill_multi", f"compress.steps.0.teacher_weights={weights}")
    assert e.value.key == "compress.steps[0].teacher_weights"


def test_teacher_weights_need_teacher_members():
    with pytest.raises(ConfigError, match="null unless teacher: members") as e:
        recipe("distill", "+compress.steps.0.teacher_weights=[1,1]")
    assert e.value.key == "compress.steps[0].teacher_weights"


def test_teacher_weights_length_is_checked_against_the_members():
    r = recipe("distill_multi", "compress.steps.0.teacher_weights=[1,2,0]")
    r.check(MLP(40, 10), SPEC, members=3)
    for count in (2, 4):
        with pytest.raises(ConfigError, match=f"the job has {count} members") as e:
            r.check(MLP(40, 10), SPEC, members=count)
        assert e.value.key == "compress.steps[0].teacher_weights" and e.value.value == [1.0, 2.0, 0.0]


def test_teacher_weights_length_fails_in_the_pipeline_before_training(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(runner.members, "train_classifier", lambda *a, **k: trained.append(a))
    cfg = compose_config(
        [
            "model=mlp",
            "ensemble=seeds5",
            "ensemble.seeds=[0,1]",
            "compress=distill_multi",
            "compress.steps.0.teacher_weights=[1,1,1]",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=r"compress.steps\[0\].teacher_weights=\[1.0, 1.0, 1.0\].*2 non-negative"):
        runner.pipeline.run(cfg)
    assert not trained


def test_a_single_member_is_the_teacher_of_teacher_members():
    r = recipe("distill_multi")
    r.check(MLP(40, 10), SPEC, members=1)
    with pytest.raises(ConfigError, match="the job has 1 member[),]"):
        recipe("distill_multi", "compress.steps.0.teacher_weights=[1,1]").check(MLP(40, 10), SPEC, members=1)


# --- teacher memo: each training row through the teacher once -------------------------------------


class Counting(nn.Module):
    """A teacher that counts the rows it is run on."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x):
        self.rows += len(x["a"]) if isinstance(x, dict) else len(x)
        return self.net(x["a"] + x["b"]) if isinstance(x, dict) else self.net(x)


@pytest.mark.parametrize("inputs", ["tensor", "dict"])
def test_teacher_memo_answers_every_order_and_batching_with_the_teachers_logits(inputs):
    from runner.compress.distill import TeacherMemo

    torch.manual_seed(0)
    teacher = Counting(MLP(40, 10, hidden=8)).eval()
    x = torch.randn(24, 40) if inputs == "tensor" else {"a": torch.randn(24, 40), "b": torch.randn(24, 40)}
    rows = lambda i: x[i] if inputs == "tensor" else {k: v[i] for k, v in x.items()}  # noqa: E731
    memo = TeacherMemo(teacher)
    first = memo(rows(torch.arange(0, 16)))
    assert teacher.rows == 16 and memo.misses == 16
    order = torch.randperm(24)
    again = memo(rows(order))  # 16 of these were seen: only the other 8 run
    assert teacher.rows == 24 and memo.misses == 24
    with torch.no_grad():
        truth = teacher.net(x if inputs == "tensor" else x["a"] + x["b"])
    torch.testing.assert_close(first, truth[:16])
    torch.testing.assert_close(again, truth[order])
    memo(rows(torch.arange(24).flip(0)))
    assert teacher.rows == 24  # a whole epoch in another order: nothing runs


def test_an_ensemble_teacher_runs_once_for_all_students_and_gives_the_same_students(mnist1d_small):
    """teacher: ensemble: the fused ensemble sees each training row once per job (not once per epoch and
    student); the students are those of distilling against the teacher itself on every batch."""
    torch.manual_seed(0)
    teacher = Counting(MLP(40, 10, hidden=8)).eval()
    rows = len(mnist1d_small.splits["train"][1])
    start = MLP(40, 10, hidden=4)  # every student starts here (Distill trains a copy)
    step = Distill(student=start, teacher="ensemble", epochs=2, lr=1e-2)
    ctx = CompressContext(mnist1d_small, TINY_TRAINER, OPTIM, ensemble=teacher)
    students = []
    for seed in (0, 1):
        pl.seed_everything(seed)
        students.append(step.apply(MLP(40, 10), ctx))
    assert teacher.rows == rows  # 2 students x 2 epochs, one pass of the teacher

    plain = Distill(student=start, teacher="ensemble", epochs=2, lr=1e-2)
    plain.memos = lambda teachers: [None] * len(teachers)  # the teacher on every batch, as before the memo
    pl.seed_everything(1)
    reference = plain.apply(MLP(40, 10), ctx)
    assert teacher.rows == rows * 3  # 2 epochs more
    for a, b in zip(students[1].state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_member_teacher_memo_lives_for_one_student(mnist1d_small):
    torch.manual_seed(0)
    teacher = Counting(MLP(40, 10, hidden=8)).eval()
    rows = len(mnist1d_small.splits["train"][1])
    step = Distill(student=MLP(40, 10, hidden=4), teacher="member", epochs=3, lr=1e-2)
    ctx = CompressContext(mnist1d_small, TINY_TRAINER, OPTIM)
    step.apply(teacher, ctx)
    assert teacher.rows == rows  # 3 epochs, one pass
    step.apply(teacher, ctx)
    assert teacher.rows == 2 * rows  # a member's memo is not kept: the next member is another teacher


# --- features: projections and loss ----------------------------------------------------------------


@pytest.mark.parametrize(
    "student, teacher, layer, pool_to, out",
    [
        (FeatureShape((64,)), FeatureShape((125,)), nn.Linear, None, (125,)),
        (FeatureShape((64,)), FeatureShape((64,)), nn.Identity, None, (64,)),
        (FeatureShape((7, 16), tokens=True), FeatureShape((7, 32), tokens=True), nn.Linear, None, (32, 7)),
        (FeatureShape((9, 16), tokens=True), FeatureShape((32, 7)), nn.Linear, (7,), (32, 7)),
        (FeatureShape((25, 10)), FeatureShape((16, 5)), nn.Conv1d, (5,), (16, 5)),
        (FeatureShape((20, 12, 12)), FeatureShape((32, 14, 14)), nn.Conv2d, (12, 12), (32, 12, 12)),
        (FeatureShape((50, 8, 8)), FeatureShape((50, 7, 9)), nn.Identity, (7, 8), (50, 7, 8)),
    ],
)
def test_projection_is_chosen_by_shape(student, teacher, layer, pool_to, out):
    """Linear for (N, C) and tokens, 1x1 conv for maps, the larger spatial size pooled to the smaller;
    both come out channels-first."""
    proj = FeatureProjection(student, teacher)
    assert type(proj.proj) is layer and proj.size == pool_to
    if layer in (nn.Conv1d, nn.Conv2d):
        assert proj.proj.kernel_size == (1,) * len(pool_to)
    s, t = proj(torch.randn(2, *student.shape), torch.randn(2, *teacher.shape))
    assert s.shape == t.shape == (2, *out)


def test_feature_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    linear = FeatureProjection(FeatureShape((6,)), FeatureShape((4,)))
    conv = FeatureProjection(FeatureShape((3, 8, 8)), FeatureShape((5, 4, 4)))
    s1, t1 = torch.randn(8, 6), torch.randn(8, 4)
    s2, t2 = torch.randn(8, 3, 8, 8), torch.randn(8, 5, 4, 4)
    got = feature_loss([s1, s2], [t1, t2], [linear, conv], [0.5, 2.0])
    w1, b1 = linear.proj.weight, linear.proj.bias
    mse1 = ((s1 @ w1.T + b1 - t1) ** 2).mean()
    pooled = s2.view(8, 3, 4, 2, 4, 2).mean((3, 5))  # 8x8 -> 4x4: means of 2x2 blocks
    w2, b2 = conv.proj.weight[:, :, 0, 0], conv.proj.bias
    mse2 = ((torch.einsum("oc,nchw->nohw", w2, pooled) + b2.view(1, -1, 1, 1) - t2) ** 2).mean()
    assert got.item() == pytest.approx((0.5 * mse1 + 2.0 * mse2).item(), rel=1e-6)


def test_distill_module_adds_the_feature_loss_of_the_hooked_modules():
    torch.manual_seed(0)
    net, teacher = MLP(40, 10, hidden=8), CNN1D(40, 10, channels=4)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    pairs = [FeaturePair("body", "body.6", 0.3), FeaturePair("head", "head", 2.0, "input")]
    projections = [FeatureProjection(FeatureShape((8,)), FeatureShape((20,))) for _ in pairs]
    module = DistillModule(net, teacher=teacher, temperature=2.0, alpha=0.6, features=pairs, projections=projections)
    module.on_fit_start()
    logits = net(x)
    got = module.loss(logits, y, x).item()
    module.remove_hooks()
    assert hooks_left(net) == hooks_left(teacher) == 0
    with torch.no_grad():
        tf = teacher.body(x.view(16, 1, 40))
        hand = (
            0.6 * hand_kl(logits, teacher(x), 2.0)
            + 0.4 * F.cross_entropy(logits, y)
            + 0.3 * F.mse_loss(projections[0].proj(net.body(x)), tf)
            + 2.0 * F.mse_loss(projections[1].proj(net.body(x)), tf)
        )
    assert got == pytest.approx(hand.item(), rel=1e-5)
    # the optimizer trains the projections with the student
    groups = module.configure_optimizers().param_groups
    assert [len(g["params"]) for g in groups] == [len(list(net.parameters())), 4]


def test_probe_reads_the_layout_of_3d_features():
    cnn, gru = CNN1D(40, 10, channels=4), GRU(40, 10, hidden=3)
    shapes = probe_features(cnn, SPEC.example, ["body.1", "body.4", "head"], ["output", "output", "input"], ["k"] * 3)
    assert shapes == [FeatureShape((4, 19)), FeatureShape((4, 5)), FeatureShape((20,))]
    assert probe_features(gru, SPEC.example, ["rnn"], ["output"], ["k"]) == [FeatureShape((40, 6), tokens=True)]
    assert hooks_left(cnn) == hooks_left(gru) == 0


# --- features: checks before training ----------------------------------------------------------------


def test_bad_module_names_fail_in_check_listing_names():
    r = recipe("distill_features", "compress.steps.0.features=[{student:body.9,teacher:body.6}]")
    with pytest.raises(ConfigError) as e:
        r.check(CNN1D(40, 10), SPEC)
    assert e.value.key == "compress.steps[0].features[0].student" and e.value.value == "body.9"
    assert "MLP" in str(e.value) and str(e.value).endswith("available: body, body.0, body.1, body.2, body.3, head")
    r = recipe("distill_features", "compress.steps.0.features=[{student:body,teacher:body.6}]")
    r.check(CNN1D(40, 10), SPEC)  # body.6 (the Flatten) exists ...
    with pytest.raises(ConfigError) as e:
        r.check(MLP(40, 10), SPEC)  # ... in the CNN, not in the MLP
    assert e.value.key == "compress.steps[0].features[0].teacher" and "close: ['body." in str(e.value)
    with pytest.raises(ConfigError) as e:
        r.check(ResNetCIFAR(8, 10, [1, 8, 5]), SPEC)
    assert e.value.key == "compress.steps[0].features[0].teacher"
    names = [n for n, _ in ResNetCIFAR(8, 10, [1, 8, 5]).named_modules() if n]
    assert str(e.value).endswith(f"{', '.join(names[:20])}, ... ({len(names)} in all)") and len(names) > 20
    r = recipe(
        "distill_features", "compress.steps.0.features=[{student:body,teacher:body.6},{student:body,teacher:stages.1}]"
    )
    with pytest.raises(ConfigError) as e:
        r.check(CNN1D(40, 10), SPEC)
    assert e.value.key == "compress.steps[0].features[1].teacher" and e.value.value == "stages.1"


def test_features_of_different_ranks_fail_in_check():
    r = recipe("distill_features", "compress.steps.0.features=[{student:body,teacher:body.1}]")
    with pytest.raises(
        ConfigError,
        match=r"student 'body' gives \(None, 64\), teacher 'body.1' gives "
        r"\(None, 25, 19\)",
    ) as e:
        r.check(CNN1D(40, 10), SPEC)
    assert e.value.key == "compress.steps[0].features[0].teacher"
    r = recipe("distill_features", "compress.steps.0.features=[{student:body,teacher:rnn}]")
    with pytest.raises(ConfigError, match=r"teacher 'rnn' gives tokens \(None, 40, 6\)"):
        r.check(GRU(40, 10, hidden=3), SPEC)  # a GRU's output is (N, L, C): said so


def test_a_failed_feature_distillation_leaves_no_hook_on_the_teacher(mnist1d_small, monkeypatch):
    teacher = CNN1D(40, 10, channels=4)
    step = recipe("distill_features", "compress.steps.0.features=[{student:body,teacher:body}]").steps[0]

    def broken(self, batch, batch_idx):
        assert hooks_left(teacher) > 0  # the taps are on while it trains
        raise RuntimeError("step failed")

    monkeypatch.setattr(DistillModule, "training_step", broken)
    with pytest.raises(RuntimeError, match="step failed"):
        step.apply(teacher, CompressContext(mnist1d_small, TINY_TRAINER, OPTIM, teacher=teacher))
    assert hooks_left(teacher) == 0


@pytest.mark.parametrize(
    "override, key",
    [
        ("compress.steps.0.teacher=ensemble", "compress.steps[0].features"),
        ("compress.steps.0.teacher=members", "compress.steps[0].features"),
        ("compress.steps.0.features=[{student:body,teacher:body,weight:-1}]", "compress.steps[0].features[0].weight"),
        (
            "compress.steps.0.features=[{student:body,teacher:body,capture:grad}]",
            "compress.steps[0].features[0].capture",
        ),
        ("compress.steps.0.features=[{student:body,teacher:body,layer:3}]", "compress.steps[0].features[0].layer"),
        ("compress.steps.0.features=[{student:body}]", "compress.steps[0].features[0].teacher"),
        ("compress.steps.0.features=body", "compress.steps[0].features"),
    ],
)
def test_bad_feature_settings_fail_when_the_recipe_is_built(override, key):
    with pytest.raises(ConfigError) as e:
        recipe("distill_features", override)
    assert e.value.key == key


def test_the_documented_resnet20_to_lenet5_example_fits():
    cfg = compose_config(
        [
            "data=mnist5k",
            "model=resnet20",
            "compress=distill_features",
            "model@compress.student=lenet5",
            "compress.steps.0.features=[{student:body.2,teacher:stages.1,weight:1.0}]",
        ]
    )
    r = build_recipe(cfg.compress)
    teacher, x = build_model(cfg.model), torch.randn(4, 1, 28, 28)
    r.check(teacher, DataSpec(10, x, {"shape": [1, 28, 28], "dtype": "float32"}))
    student = r.steps[0].build_student()
    assert isinstance(student, LeNet5) and isinstance(teacher, ResNetCIFAR)
    [proj] = r.steps[0]._probe(student, teacher, x)
    assert type(proj.proj) is nn.Conv2d and proj.proj.weight.shape == (32, 20, 1, 1) and proj.size == (12, 12)


# --- features: a short run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_run(mnist1d_small):
    """Distill.apply on the caller's own CNN teacher (no recipe copy in between), one epoch, fixed seed."""
    pl.seed_everything(0, verbose=False)
    teacher = CNN1D(40, 10, channels=8).train()
    teacher.body[0].eval()  # a mixed-mode teacher must come back mixed
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    step = recipe(
        "distill_features",
        "compress.steps.0.epochs=1",
        "compress.steps.0.mixup=0",
        "compress.steps.0.features=[{student:body,teacher:body,weight:1.0},{student:body.1,teacher:body.6,weight:0.5}]",
    ).steps[0]
    out = step.apply(teacher, CompressContext(mnist1d_small, TINY_TRAINER, OPTIM, teacher=teacher))
    return step, teacher, before, out


def test_after_training_the_student_is_a_fresh_student_and_the_teacher_is_untouched(feature_run):
    step, teacher, before, out = feature_run
    fresh = build_model(compose_config(["compress=distill_features"]).compress.student)
    assert type(out) is MLP and n_params(out) == n_params(fresh) == 40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert [n for n, _ in out.named_modules()] == [n for n, _ in fresh.named_modules()]
    after = teacher.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hooks_left(teacher) == 0 and hooks_left(out) == 0
    assert teacher.training and not teacher.body[0].training and teacher.body[2].training


def test_feature_distillation_lowers_the_feature_mse(feature_run):
    step, _, _, _ = feature_run
    stats = step.stats_
    assert set(stats) == {"distill/feature_mse_before", "distill/feature_mse_after"}
    assert stats["distill/feature_mse_after"] < stats["distill/feature_mse_before"]


# --- end to end --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_multi_teacher_distillation_through_the_pipeline(tmp_path):
    cfg = compose_config(
        [
            "model=mlp",
            "ensemble=seeds5",
            "ensemble.seeds=[0,1]",
            "compress=distill_multi",
            "compress.steps.0.epochs=1",
            "compress.steps.0.teacher_weights=[3,1]",
        ],
        tmp_path,
    )
    results = runner.pipeline.run(cfg)
    student = n_params(build_model(cfg.compress.student))
    for name in ("mlp-s0", "mlp-s1"):
        assert results[f"compressed/{name}/params"] == student < results[f"member/{name}/params"]
        assert 0.0 <= results[f"compressed/{name}/test/acc"] <= 1.0
        assert f"compressed/{name}/delta/acc" in results
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("runner").experiment_id], "tags.role = 'compressed'")
    assert sorted(r.data.metrics["test/acc"] for r in runs) == sorted(
        results[f"compressed/{n}/test/acc"] for n in ("mlp-s0", "mlp-s1")
    )


def test_an_ensemble_teacher_without_an_ensemble_names_the_step_s_teacher_key():
    step = recipe("distill", "compress.steps.0.teacher=ensemble").steps[0]
    with pytest.raises(ConfigError) as e:
        step.teachers(MLP(40, 10), CompressContext(None, {}, {}))
    assert (e.value.key, e.value.value) == ("compress.steps[0].teacher", "ensemble")

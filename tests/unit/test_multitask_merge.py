"""Multi-task merging (runner.fuse.multitask) against closed forms and hand computations on tiny nets:
only the backbone merged, each task's own head (of its own shape) kept, buffers averaged, bad inputs
refused naming their key, the task nets left as they were."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.testing import assert_close

from runner.errors import ConfigError
from runner.fuse.merge import SCALING_GRID, disjoint_mean, elect_signs, trim
from runner.fuse.multitask import (
    DARE,
    TIES,
    TSVM,
    AdaMerging,
    Average,
    Fisher,
    IsoC,
    ModelStock,
    PoolMerge,
    RegMean,
    TaskArithmetic,
    TaskModel,
    backbone_keys,
    diagonal_fisher,
    fisher_average,
    mean_entropy,
)
from runner.models.facts import copy_facts, set_head_name

# --- tiny nets -----------------------------------------------------------------------------------


class Net(nn.Module):
    """A backbone (`body`) and a classifier (`head`), the head declared by name."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head
        set_head_name(self, "head")

    def forward(self, x):
        return self.head(self.body(x))


class TextBody(nn.Module):
    """Token embeddings, a Linear on every token, the mean over the real tokens (attention_mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 4), nn.Linear(4, 4)

    def forward(self, x: dict) -> torch.Tensor:
        mask = x["attention_mask"].unsqueeze(-1).float()
        return (self.lin(self.emb(x["input_ids"])) * mask).sum(1) / mask.sum(1)


def mlp() -> Net:
    return Net(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5)), nn.Linear(5, 2))


def make_tasks(start: Net, deltas: list[dict], classes: list[int], inputs=None, labels=None, heads=None):
    """(theta_0's state dict, one TaskModel per delta): a copy of `start` with the delta added to its
    backbone and a new head of its own number of classes (or the given head)."""
    width = start.head.in_features
    tasks = []
    for i, (delta, c) in enumerate(zip(deltas, classes)):
        net = copy_facts(start, copy.deepcopy(start))
        net.head = heads[i] if heads else nn.Linear(width, c)
        with torch.no_grad():
            for k, d in delta.items():
                net.get_parameter(k).add_(d)
        tasks.append(TaskModel(f"t{i}", net, inputs[i] if inputs else None, labels[i] if labels else None))
    return {k: v.clone() for k, v in start.state_dict().items()}, tasks


def random_tasks(classes=(2, 3), rows: int = 16, seed: int = 0):
    """An MLP backbone fine-tuned (random task vectors) for tasks of `classes` classes, with inputs."""
    torch.manual_seed(seed)
    start = mlp()
    deltas = [{k: 0.5 * torch.randn_like(v) for k, v in start.body.named_parameters(prefix="body")} for _ in classes]
    inputs = [torch.randn(rows, 4) for _ in classes]
    labels = [torch.randint(0, c, (rows,)) for c in classes]
    return make_tasks(start, deltas, list(classes), inputs, labels)


def linear(weight, bias=None) -> nn.Linear:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer


# theta_0 and two task vectors of a Linear(3, 2) backbone (the values of tests/unit/test_merge.py)
START_W, START_B = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]], [0.5, -0.5]
TAU = [
    {"body.weight": torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.25, -1.0]]), "body.bias": torch.tensor([1.0, 0.0])},
    {"body.weight": torch.tensor([[-0.5, -1.0, 0.5], [2.0, -0.25, 0.0]]), "body.bias": torch.tensor([-3.0, 0.75])},
]


def hand_tasks(classes=(2, 4)):
    torch.manual_seed(0)
    return make_tasks(Net(linear(START_W, START_B), nn.Linear(2, 2)), TAU, list(classes))


def assert_heads_kept(method: PoolMerge, tasks: list[TaskModel]) -> None:
    """No head entry merged; each task's net keeps its own head (and its shape)."""
    assert not [k for k in method.merged_ if k.startswith("head.")]
    for t in tasks:
        net = method.task_net(t)
        assert_close(net.head.weight, t.net.head.weight, rtol=0, atol=0)
        assert_close(net.head.bias, t.net.head.bias, rtol=0, atol=0)
        for k, v in method.merged_.items():
            assert_close(net.state_dict()[k], v, rtol=0, atol=0)


# --- the contract --------------------------------------------------------------------------------


def test_backbone_keys_are_every_state_dict_entry_but_the_head_s():
    net = Net(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), nn.Linear(6, 3))
    assert backbone_keys(net) == [
        "body.0.weight",
        "body.0.bias",
        "body.1.weight",
        "body.1.bias",
        "body.1.running_mean",
        "body.1.running_var",
        "body.1.num_batches_tracked",
    ]


def test_average_merges_the_backbones_and_each_task_keeps_its_own_head_of_its_own_shape():
    start, tasks = random_tasks(classes=(2, 3, 5))
    method = Average().fit(start, tasks)
    assert list(method.merged_) == backbone_keys(tasks[0].net)
    for k in method.merged_:
        assert_close(method.merged_[k], torch.stack([t.net.state_dict()[k] for t in tasks]).mean(0))
    assert_heads_kept(method, tasks)
    x = torch.randn(3, 4)
    for t, classes in zip(tasks, (2, 3, 5)):
        body = copy.deepcopy(t.net.body)
        body.load_state_dict({k.removeprefix("body."): v for k, v in method.merged_.items()})
        out = method.task_net(t)(x)
        assert out.shape == (3, classes)
        assert_close(out, t.net.head(body(x)))
    assert method.stats() == {}


def test_merges_compute_in_float32_and_cast_back_to_the_parameter_dtype():
    start, tasks = random_tasks()
    for t in tasks:
        t.net.to(torch.bfloat16)
    method = Average().fit({k: v.to(torch.bfloat16) for k, v in start.items()}, tasks)
    for k, v in method.merged_.items():
        assert v.dtype == torch.bfloat16
        expected = (tasks[0].net.state_dict()[k].float() + tasks[1].net.state_dict()[k].float()) / 2
        assert torch.equal(v, expected.to(torch.bfloat16))


def test_task_arithmetic_is_the_start_plus_the_scaled_sum_of_backbone_task_vectors():
    start, tasks = hand_tasks()
    method = TaskArithmetic(scaling=0.5).fit(start, tasks)
    # theta_0 + 0.5 * (tau_1 + tau_2); tau_1 + tau_2 = [[0.5, -3, 1], [2, 0, -1]], [-2, 0.75]
    assert torch.equal(method.merged_["body.weight"], torch.tensor([[1.25, -1.5, -0.5], [1.0, 2.0, -0.5]]))
    assert torch.equal(method.merged_["body.bias"], torch.tensor([-0.5, -0.125]))
    assert_heads_kept(method, tasks)
    assert method.stats() == {"merge/scaling": 0.5}


def test_a_null_scaling_is_chosen_by_the_tasks_mean_val_accuracy_the_smaller_on_ties():
    # f(x) = x + lambda (start: weight 1, bias 0; each task vector adds 0.5 to the bias). Task A's head
    # says class 0 iff f > 0 and its row x = -0.55 is class 0: right from lambda = 0.6. Task B (3 classes,
    # class 2 never wins) says class 1 iff f < 0, its row x = -0.75 is class 1: right up to lambda = 0.7.
    start_net = Net(linear([[1.0]], [0.0]), linear([[1.0], [-1.0]], [0.0, 0.0]))
    heads = [linear([[1.0], [-1.0]], [0.0, 0.0]), linear([[1.0], [-1.0], [0.0]], [0.0, 0.0, -10.0])]
    delta = {"body.bias": torch.tensor([0.5])}
    inputs, labels = [torch.tensor([[-0.55]]), torch.tensor([[-0.75]])], [torch.tensor([0]), torch.tensor([1])]
    start, tasks = make_tasks(start_net, [delta, delta], [2, 3], inputs, labels, heads)
    method = TaskArithmetic(scaling=None)
    assert method.needs_labels and method.needs_inputs
    method.fit(start, tasks)
    assert method.grid_val_acc_ == {s: 1.0 if s in (0.6, 0.7) else 0.5 for s in SCALING_GRID}
    assert method.stats() == {"merge/scaling": 0.6, "merge/val_acc": 1.0}
    assert_close(method.merged_["body.bias"], torch.tensor([0.6]))


def test_ties_merges_the_backbone_task_vectors_as_by_hand():
    start, tasks = hand_tasks()
    method = TIES(density=0.5, scaling=0.5).fit(start, tasks)
    # top 4 of 8 entries: tau_1 -> [[1, -2, 0], [0, 0, -1]], [1, 0]; tau_2 -> [[0, -1, 0], [2, 0, 0]], [-3, 0.75];
    # elected signs and disjoint means: [[1, -1.5, 0], [2, 0, -1]], [-3, 0.75]
    assert torch.equal(method.merged_["body.weight"], torch.tensor([[1.5, -0.75, -1.0], [1.0, 2.0, -0.5]]))
    assert torch.equal(method.merged_["body.bias"], torch.tensor([-1.0, -0.125]))
    assert_heads_kept(method, tasks)


@pytest.mark.parametrize("combine, density", [("sum", 1.0), ("ties", 1.0), ("ties", 0.5)])
def test_dare_drops_with_masks_drawn_in_task_then_state_dict_order(combine, density):
    start, tasks = hand_tasks()
    method = DARE(drop_rate=0.5, combine=combine, density=density, scaling=0.5, seed=3).fit(start, tasks)
    generator, dropped, n = torch.Generator().manual_seed(3), [], 0
    for tau in TAU:
        kept = {}
        for k in ("body.weight", "body.bias"):
            keep = torch.rand(tau[k].shape, generator=generator) >= 0.5
            kept[k], n = tau[k] * keep / 0.5, n + int((~keep).sum())
        dropped.append(kept)
    dropped = trim(dropped, density) if density < 1 else dropped  # then DARE-TIES's optional trim
    direction = (
        disjoint_mean(dropped, elect_signs(dropped))
        if combine == "ties"
        else {k: dropped[0][k] + dropped[1][k] for k in dropped[0]}
    )
    for k, v in direction.items():
        assert_close(method.merged_[k], start[k] + 0.5 * v)
    assert method.stats() == {"merge/scaling": 0.5, "merge/dropped_fraction": n / 16}
    assert_heads_kept(method, tasks)


def test_dare_without_a_drop_is_task_arithmetic():
    start, tasks = random_tasks()
    dare = DARE(drop_rate=0.0, scaling=0.4).fit(start, tasks)
    arithmetic = TaskArithmetic(scaling=0.4).fit(start, tasks)
    for k, v in arithmetic.merged_.items():
        assert_close(dare.merged_[k], v)


def test_float_buffers_are_averaged_and_integer_buffers_come_from_the_first_task():
    torch.manual_seed(0)
    start_net = Net(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Linear(3, 2))
    deltas = [{"body.0.weight": torch.full((3, 4), 1.0)}, {"body.0.weight": torch.full((3, 4), -3.0)}]
    start, tasks = make_tasks(start_net, deltas, [2, 5])
    for t, mean, var, count in zip(tasks, (1.0, 3.0), (2.0, 6.0), (7, 9)):
        t.net.body[1].running_mean.fill_(mean)
        t.net.body[1].running_var.fill_(var)
        t.net.body[1].num_batches_tracked.fill_(count)
    method = TaskArithmetic(scaling=0.5).fit(start, tasks)
    assert torch.equal(method.merged_["body.1.running_mean"], torch.full((3,), 2.0))
    assert torch.equal(method.merged_["body.1.running_var"], torch.full((3,), 4.0))
    assert method.merged_["body.1.num_batches_tracked"] == 7
    assert_close(method.merged_["body.0.weight"], start["body.0.weight"] - 1.0)  # theta_0 + 0.5 * (1 - 3)


# --- Fisher --------------------------------------------------------------------------------------


def test_fisher_average_of_equal_or_zero_fishers_is_the_plain_average_and_weighs_by_fisher():
    states = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    mean = torch.tensor([2.0, 2.0])
    assert_close(fisher_average(states, [{"w": torch.tensor([0.7, 5.0])}] * 2)["w"], mean)
    assert_close(fisher_average(states, [{"w": torch.zeros(2)}] * 2)["w"], mean)
    weighted = fisher_average(states, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 2.0])}], eps=0.0)
    assert_close(weighted["w"], torch.tensor([(1 + 9) / 4, 6.0]))


def sigmoid_fisher(w: float, a: float, x: torch.Tensor) -> torch.Tensor:
    """The Fisher of w for logits [a w x, -a w x]: the mean over rows of 4 a^2 x^2 p0 p1, p0 = sigmoid(2 a w x)."""
    p0 = torch.sigmoid(2 * a * w * x)
    return (4 * a**2 * x**2 * p0 * (1 - p0)).mean()


def fisher_tasks():
    start_net = Net(nn.Linear(1, 1, bias=False), nn.Linear(1, 2))
    with torch.no_grad():
        start_net.body.weight.fill_(0.5)
    heads = [linear([[1.0], [-1.0]], [0.0, 0.0]), linear([[2.0], [-2.0]], [0.0, 0.0])]
    inputs = [torch.tensor([[1.0], [-2.0], [0.5]]), torch.tensor([[0.25], [1.5]])]
    deltas = [{"body.weight": torch.tensor([[0.3]])}, {"body.weight": torch.tensor([[-0.6]])}]
    return make_tasks(start_net, deltas, [2, 2], inputs, heads=heads)


def test_the_diagonal_fisher_is_the_expectation_over_the_model_s_predictions():
    _, tasks = fisher_tasks()
    for t, w, a in zip(tasks, (0.8, -0.1), (1.0, 2.0)):
        fisher = diagonal_fisher(t.net, t.inputs, ["body.weight"])
        assert_close(fisher["body.weight"], sigmoid_fisher(w, a, t.inputs).reshape(1, 1))
        assert t.net.body.weight.grad is None


def test_fisher_merging_weighs_each_backbone_by_its_fisher():
    start, tasks = fisher_tasks()
    method = Fisher(eps=1e-8).fit(start, tasks)
    f1, f2 = sigmoid_fisher(0.8, 1.0, tasks[0].inputs), sigmoid_fisher(-0.1, 2.0, tasks[1].inputs)
    expected = ((f1 + 1e-8) * 0.8 + (f2 + 1e-8) * -0.1) / (f1 + f2 + 2e-8)
    assert_close(method.merged_["body.weight"], expected.reshape(1, 1))
    assert_heads_kept(method, tasks)
    normalized = Fisher(normalize=True).fit(start, tasks)  # each Fisher over its global norm: here 1 and 1
    assert_close(normalized.merged_["body.weight"], torch.tensor([[0.35]]))


# --- RegMean -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_on_one_linear_is_the_least_squares_merge(alpha):
    torch.manual_seed(0)
    start_net = Net(nn.Linear(4, 3), nn.Linear(3, 2))
    deltas = [{"body.weight": torch.randn(3, 4), "body.bias": torch.randn(3)} for _ in range(3)]
    # small inputs: every summed Gram diagonal entry below 1 (a feature is active when its entry is > 0)
    inputs = [0.3 * (torch.randn(10, 4) + i) for i in range(3)]
    start, tasks = make_tasks(start_net, deltas, [2, 3, 4], inputs)
    method = RegMean(alpha=alpha).fit(start, tasks)
    weights = [t.net.body.weight.detach() for t in tasks]
    if alpha == 1.0:  # argmin_W sum_i ||X_i W^T - X_i W_i^T||^2, all tasks with 10 rows
        x = torch.cat(inputs).double()
        y = torch.cat([xi.double() @ w.double().T for xi, w in zip(inputs, weights)])
        expected = torch.linalg.lstsq(x, y).solution.T
    else:  # Grams X^T X / rows, off-diagonal halved
        grams = [xi.double().T @ xi.double() / 10 for xi in inputs]
        grams = [0.5 * g + 0.5 * torch.diag(torch.diagonal(g)) for g in grams]
        expected = torch.linalg.solve(sum(grams), sum(g @ w.double().T for g, w in zip(grams, weights))).T
    assert_close(method.merged_["body.weight"], expected.float(), atol=1e-5, rtol=1e-5)
    assert_close(method.merged_["body.bias"], torch.stack([t.net.body.bias for t in tasks]).mean(0))
    assert method.stats() == {"merge/regmean_layers": 1.0}
    assert_heads_kept(method, tasks)


def test_regmean_reads_only_the_real_tokens_of_padded_text_each_task_weighing_alike():
    torch.manual_seed(0)
    start_net = Net(TextBody(), nn.Linear(4, 2))
    deltas = [{k: 0.5 * torch.randn_like(v) for k, v in start_net.body.named_parameters(prefix="body")} for _ in (0, 1)]
    inputs = []
    for lengths in ([6, 3, 2], [4, 5, 6, 1]):  # 11 and 16 real tokens, the rest padding (id 0)
        mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).long()
        inputs.append({"input_ids": torch.randint(1, 10, (len(lengths), 6)) * mask, "attention_mask": mask})
    start, tasks = make_tasks(start_net, deltas, [2, 3], inputs)
    method = RegMean(alpha=1.0).fit(start, tasks)
    xs, ys = [], []
    for t, x in zip(tasks, inputs):
        with torch.no_grad():
            rows = t.net.body.emb(x["input_ids"])[x["attention_mask"] != 0].double()
        xs.append(rows / math.sqrt(len(rows)))
        ys.append(rows @ t.net.body.lin.weight.detach().double().T / math.sqrt(len(rows)))
    expected = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    assert_close(method.merged_["body.lin.weight"], expected.float(), atol=1e-5, rtol=1e-5)
    assert_close(method.merged_["body.emb.weight"], (tasks[0].net.body.emb.weight + tasks[1].net.body.emb.weight) / 2)


# --- AdaMerging ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["task", "layer"])
def test_adamerging_with_no_steps_is_task_arithmetic_at_init(mode):
    start, tasks = random_tasks()
    method = AdaMerging(mode=mode, steps=0, init=0.3).fit(start, tasks)
    arithmetic = TaskArithmetic(scaling=0.3).fit(start, tasks)
    assert list(method.merged_) == list(arithmetic.merged_)
    for k, v in arithmetic.merged_.items():
        assert torch.equal(method.merged_[k], v), k
    stats = method.stats()
    assert {k: stats[k] for k in ("merge/lambda/t0", "merge/lambda/t1")} == {
        "merge/lambda/t0": 0.3,
        "merge/lambda/t1": 0.3,
    }
    assert stats["merge/entropy"] == stats["merge/entropy_init"]


def objective(method: PoolMerge, tasks: list[TaskModel]) -> float:
    """AdaMerging's objective: the sum over the tasks of the mean entropy of its merged net's predictions."""
    return sum(mean_entropy(method.task_net(t), t.inputs) for t in tasks)


@pytest.mark.parametrize("mode", ["task", "layer"])
def test_adamerging_fits_coefficients_that_lower_the_entropy_of_every_task_s_predictions(mode):
    start, tasks = random_tasks(rows=24)
    method = AdaMerging(mode=mode, steps=30, lr=0.05, batch_size=8).fit(start, tasks)
    at_init = objective(TaskArithmetic(scaling=0.3).fit(start, tasks), tasks)
    fitted = objective(method, tasks)
    assert fitted < at_init - 0.01
    stats = method.stats()
    assert_close(stats["merge/entropy"], fitted)
    assert_close(stats["merge/entropy_init"], at_init)
    sizes = {"task": 1, "layer": 4}[mode]  # one lambda per task, or per task and backbone parameter tensor
    for t in tasks:
        lambdas = method.coefficients_[t.name]
        assert len(lambdas) == sizes and lambdas != [0.3] * sizes
        assert_close(stats[f"merge/lambda/{t.name}"], sum(lambdas) / sizes)
    layer = {
        "task": lambda i, j: method.coefficients_[f"t{i}"][0],
        "layer": lambda i, j: method.coefficients_[f"t{i}"][j],
    }
    for j, k in enumerate(["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]):
        taus = [t.net.state_dict()[k] - start[k] for t in tasks]
        expected = start[k] + sum(layer[mode](i, j) * tau for i, tau in enumerate(taus))
        assert_close(method.merged_[k], expected)


# --- Model Stock, TSVM, Iso-C -------------------------------------------------------------------


def vector_tasks(taus: list[list[float]], start: list[float]):
    """A backbone of one vector parameter (a bias-free Linear(1, d)): its weight is `start`."""
    start_net = Net(linear([[v] for v in start]), nn.Linear(len(start), 2))
    deltas = [{"body.weight": torch.tensor([[v] for v in tau])} for tau in taus]
    return make_tasks(start_net, deltas, [2] * len(taus))


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    # tau_1 = (1, 0), tau_2 = (cos 60, sin 60): cos = 1/2, t = 2 (1/2) / (1 + 1/2) = 2/3;
    # merged = theta_0 + t * mean(tau) = (1, 2) + 2/3 (0.75, sqrt(3)/4)
    start, tasks = vector_tasks([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], [1.0, 2.0])
    method = ModelStock().fit(start, tasks)
    assert_close(method.merged_["body.weight"], torch.tensor([[1.5], [2 + math.sqrt(3) / 6]]))
    assert_close(method.stats()["merge/ratio_mean"], 2 / 3)
    # three orthogonal task vectors: cos = 0, t = 0 (theta_0); opposite ones: cos = -1 clamped to 0
    start, tasks = vector_tasks([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]], [1.0, 2.0, 3.0])
    assert_close(ModelStock().fit(start, tasks).merged_["body.weight"], start["body.weight"])
    start, tasks = vector_tasks([[1.0, 1.0], [-2.0, -2.0]], [1.0, 2.0])
    assert_close(ModelStock().fit(start, tasks).merged_["body.weight"], start["body.weight"])


def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))[0]


def matrix_tasks(taus: list[torch.Tensor], biases: list[torch.Tensor]):
    torch.manual_seed(0)
    n = taus[0].shape[0]
    return make_tasks(
        Net(nn.Linear(n, n), nn.Linear(n, 2)),
        [{"body.weight": tau, "body.bias": b} for tau, b in zip(taus, biases)],
        [2] + [3] * (len(taus) - 1),
    )


def test_tsvm_reconstructs_task_vectors_of_orthogonal_low_rank_subspaces_as_their_sum():
    u, v = orthogonal(4, 1), orthogonal(4, 2)
    tau1 = u[:, :2] @ torch.diag(torch.tensor([3.0, 1.0])) @ v[:, :2].T  # rank 2 = floor(4 / 2)
    tau2 = u[:, 2:] @ torch.diag(torch.tensor([2.0, 0.5])) @ v[:, 2:].T
    biases = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([-1.0, 0.0, 1.0, 0.0])]
    start, tasks = matrix_tasks([tau1, tau2], biases)
    method = TSVM(scaling=0.5).fit(start, tasks)
    assert_close(method.merged_["body.weight"], start["body.weight"] + 0.5 * (tau1 + tau2), atol=1e-5, rtol=1e-5)
    assert_close(method.merged_["body.bias"], start["body.bias"] + 0.5 * (biases[0] + biases[1]) / 2)
    assert_heads_kept(method, tasks)


def test_tsvm_keeps_each_task_s_top_singular_vectors_and_orthogonalises_them():
    u, v = orthogonal(4, 1), orthogonal(4, 2)
    zero = [torch.zeros(4), torch.zeros(4)]
    # truncation: tau_1 of rank 3 keeps its top 2 triplets (its third, 1 u3 v3^T, is dropped)
    tau1 = u[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v[:, :3].T
    tau2 = 0.5 * torch.outer(u[:, 3], v[:, 3])
    start, tasks = matrix_tasks([tau1, tau2], zero)
    merged = TSVM(scaling=1.0).fit(start, tasks).merged_["body.weight"]
    assert_close(merged, start["body.weight"] + tau1 + tau2 - torch.outer(u[:, 2], v[:, 2]), atol=1e-5, rtol=1e-5)
    # interference: two rank-1 task vectors whose directions are not orthogonal; U_cat and V_cat replaced
    # by their polar factors A (A^T A)^(-1/2)
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0, 0.0])
    c, d = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.8, 0.6])
    start, tasks = matrix_tasks([2.0 * torch.outer(a, c), 1.0 * torch.outer(b, d)], zero)
    merged = TSVM(scaling=1.0).fit(start, tasks).merged_["body.weight"]

    def polar(m):
        values, vectors = torch.linalg.eigh(m.T @ m)
        return m @ vectors @ torch.diag(values.rsqrt()) @ vectors.T

    us, vs = polar(torch.stack([a, b], 1)), polar(torch.stack([c, d], 1))
    expected = us @ torch.diag(torch.tensor([2.0, 1.0])) @ vs.T
    assert_close(merged, start["body.weight"] + expected, atol=1e-5, rtol=1e-5)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors_over_its_rank():
    q, r = orthogonal(3, 3), orthogonal(3, 4)
    tau1 = q @ torch.diag(torch.tensor([3.0, 0.0, 0.0])) @ r.T
    tau2 = q @ torch.diag(torch.tensor([0.0, 1.0, 0.0])) @ r.T
    biases = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, -1.0])]
    start, tasks = matrix_tasks([tau1, tau2], biases)
    method = IsoC(scaling=0.5).fit(start, tasks)
    # sum = Q diag(3, 1, 0) R^T: rank 2, mean singular value 2 -> 2 Q diag(1, 1, 0) R^T, times 0.5
    expected = start["body.weight"] + q @ torch.diag(torch.tensor([1.0, 1.0, 0.0])) @ r.T
    assert_close(method.merged_["body.weight"], expected, atol=1e-5, rtol=1e-5)
    assert_close(method.merged_["body.bias"], start["body.bias"] + 0.5 * torch.tensor([2.0, 1.0, 1.0]))
    assert method.stats() == {"merge/scaling": 0.5}


# --- what every method promises ------------------------------------------------------------------

METHODS = {
    "average": Average,
    "task_arithmetic": TaskArithmetic,
    "task_arithmetic_chosen": lambda: TaskArithmetic(scaling=None),
    "ties": TIES,
    "dare": lambda: DARE(combine="ties"),
    "fisher": lambda: Fisher(num_examples=4),
    "regmean": RegMean,
    "adamerging": lambda: AdaMerging(mode="layer", steps=2),
    "model_stock": ModelStock,
    "tsvm": TSVM,
    "iso_c": IsoC,
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fit_and_task_net_leave_the_task_nets_as_they_were(name):
    start, tasks = random_tasks(classes=(2, 3, 4), rows=8)
    for t in tasks:
        t.net.train()
    before = [{k: v.clone() for k, v in t.net.state_dict().items()} for t in tasks]
    method = METHODS[name]().fit(start, tasks)
    nets = [method.task_net(t) for t in tasks]
    for t, state, net in zip(tasks, before, nets):
        assert t.net.training and not net.training and net is not t.net
        assert all(torch.equal(v, state[k]) for k, v in t.net.state_dict().items())
        assert all(p.grad is None for p in t.net.parameters())
        assert net(t.inputs).shape == (8, t.net.head.out_features)
    assert_heads_kept(method, tasks)


def test_what_each_method_needs_of_the_tasks():
    needs = {
        name: (METHODS[name]().needs_inputs, METHODS[name]().needs_labels)
        for name in ("average", "task_arithmetic", "task_arithmetic_chosen", "fisher", "regmean", "adamerging")
    }
    assert needs == {
        "average": (False, False),
        "task_arithmetic": (False, False),
        "task_arithmetic_chosen": (True, True),
        "fisher": (True, False),
        "regmean": (True, False),
        "adamerging": (True, False),
    }


@pytest.mark.parametrize(
    "method", [Fisher(), RegMean(), AdaMerging(), TIES(scaling=None)], ids=lambda m: type(m).__name__
)
def test_a_method_that_reads_data_names_the_task_without_it(method):
    start, tasks = random_tasks()
    tasks[1].inputs = None
    with pytest.raises(ConfigError) as e:
        method.fit(start, tasks)
    assert e.value.key == "tasks.t1" and e.value.value is None
    assert str(e.value.allowed).startswith("validation inputs:")


def test_a_chosen_scaling_names_the_task_without_labels():
    start, tasks = random_tasks()
    tasks[0].labels = None
    with pytest.raises(ConfigError) as e:
        TaskArithmetic(scaling=None).fit(start, tasks)
    assert e.value.key == "tasks.t0" and str(e.value.allowed).startswith("validation labels:")


def test_a_backbone_unlike_the_start_is_refused_naming_the_task_and_key():
    start, tasks = random_tasks(classes=(2, 3, 4))
    tasks[2].net.body[2] = nn.Linear(6, 7)
    with pytest.raises(ConfigError) as e:
        Average().fit(start, tasks)
    assert e.value.key == "tasks (backbone)"
    assert e.value.value == {
        "t2": ["body.2.bias: (7,) (start: (5,))", "body.2.weight: (7, 6) (start: (5, 6))"],
    }


def test_a_backbone_unlike_the_start_in_many_keys_is_refused_listing_its_first_eight():
    start, tasks = random_tasks(classes=(2, 3))
    tasks[1].net.body = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])  # 10 keys, none like the start's
    with pytest.raises(ConfigError) as e:
        Average().fit(start, tasks)
    listed = e.value.value["t1"]
    assert len(listed) == 8 and listed[0] == "body.0.bias: (2,) (start: (6,))"


def test_one_task_or_repeated_names_are_refused():
    start, tasks = random_tasks()
    with pytest.raises(ConfigError, match="2 or more") as e:
        Average().fit(start, tasks[:1])
    assert e.value.key == "tasks"
    tasks[1].name = "t0"
    with pytest.raises(ConfigError, match="distinct task names") as e:
        Average().fit(start, tasks)
    assert e.value.key == "tasks"


def test_stats_and_task_net_before_fit_say_so():
    start, tasks = random_tasks()
    with pytest.raises(NotFittedError):
        TIES().stats()
    with pytest.raises(NotFittedError):
        Average().task_net(tasks[0])


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: TaskArithmetic(scaling=0), "merge.scaling"),
        (lambda: TaskArithmetic(scaling=float("nan")), "merge.scaling"),
        (lambda: TIES(density=0), "merge.density"),
        (lambda: TIES(scaling=-0.3), "merge.scaling"),
        (lambda: DARE(drop_rate=1.0), "merge.drop_rate"),
        (lambda: DARE(combine="max"), "merge.combine"),
        (lambda: DARE(combine="sum", density=0.5), "merge.density"),
        (lambda: DARE(seed=-1), "merge.seed"),
        (lambda: Fisher(num_examples=0), "merge.num_examples"),
        (lambda: Fisher(eps=0), "merge.eps"),
        (lambda: Fisher(normalize="yes"), "merge.normalize"),
        (lambda: RegMean(alpha=1.5), "merge.alpha"),
        (lambda: RegMean(num_examples=2.5), "merge.num_examples"),
        (lambda: AdaMerging(mode="model"), "merge.mode"),
        (lambda: AdaMerging(steps=-1), "merge.steps"),
        (lambda: AdaMerging(lr=0), "merge.lr"),
        (lambda: AdaMerging(init=True), "merge.init"),
        (lambda: AdaMerging(num_examples=0), "merge.num_examples"),
        (lambda: AdaMerging(batch_size=0), "merge.batch_size"),
        (lambda: TSVM(scaling="1"), "merge.scaling"),
        (lambda: IsoC(scaling=-1.0), "merge.scaling"),
    ],
)
def test_a_bad_parameter_is_refused_naming_its_key(make, key):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.key == key


MERGE_CONFIGS = sorted(Path(CONF_DIR, "merge").glob("*.yaml"))


@pytest.mark.parametrize("path", MERGE_CONFIGS, ids=lambda p: p.stem)
def test_every_conf_merge_yaml_builds_its_method(path):
    method = instantiate(OmegaConf.create({"seed": 0, "merge": OmegaConf.load(path)}).merge)
    assert isinstance(method, PoolMerge)
    expected = {"adamerging": ("task", AdaMerging), "adamerging_layer": ("layer", AdaMerging)}.get(path.stem)
    if expected:
        assert (method.mode, type(method)) == expected


def test_conf_merge_has_one_yaml_per_method():
    assert [p.stem for p in MERGE_CONFIGS] == sorted(
        [
            "average",
            "task_arithmetic",
            "ties",
            "dare",
            "fisher",
            "regmean",
            "adamerging",
            "adamerging_layer",
            "model_stock",
            "tsvm",
            "iso_c",
            "multitask",  # runner.fuse.joint: trains instead of merging (tests/e2e/test_pool.py)
        ]
    )


def test_joint_training_ties_the_backbones_whatever_the_tasks_are_called():
    """Tasks named like nn.Module attributes ("type", "train") train jointly: one backbone, two heads."""
    from runner.fuse.joint import train_jointly

    torch.manual_seed(0)
    nets = {
        "type": Net(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Linear(6, 2)),
        "train": Net(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Linear(6, 3)),
    }
    nets["train"].load_state_dict(
        {**nets["train"].state_dict(), **{k: v for k, v in nets["type"].state_dict().items() if k.startswith("body.")}}
    )
    start = {k: v.clone() for k, v in nets["type"].state_dict().items()}
    x = torch.randn(32, 4)
    from torch.utils.data import DataLoader, TensorDataset

    two, three = (x[:, 0] > 0).long(), (x[:, 1] > 0).long() + (x[:, 2] > 0).long()
    loaders = {"type": DataLoader(TensorDataset(x, two), 16), "train": DataLoader(TensorDataset(x, three), 8)}
    train_jointly(
        nets, loaders, {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False}, {"name": "sgd", "lr": 0.1}
    )
    one, two = nets["type"].state_dict(), nets["train"].state_dict()
    for k in one:
        if k.startswith("body."):
            assert nets["type"].get_parameter(k) is nets["train"].get_parameter(k)  # tied: one tensor
            assert not torch.equal(one[k], start[k])
    assert one["head.weight"].shape[0] == 2 and two["head.weight"].shape[0] == 3


def test_model_stock_ratio_averages_the_cosines_of_all_pairs():
    """Three task vectors, pairwise cosines 1/sqrt(2), 0 and 1/sqrt(2): cos = sqrt(2)/3, t = 3 cos / (1 + 2 cos)."""
    from runner.fuse.multitask import model_stock_ratio

    vectors = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.5])]
    cos = math.sqrt(2) / 3
    assert model_stock_ratio(vectors) == pytest.approx(3 * cos / (1 + 2 * cos), rel=1e-12)


def test_entropy_is_the_mean_of_each_row_s_shannon_entropy():
    from scipy.stats import entropy as scipy_entropy

    from runner.fuse.multitask import entropy

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [4.0, -4.0, 0.0]])
    expected = scipy_entropy(torch.softmax(logits, -1).numpy(), axis=-1).mean()
    assert float(entropy(logits)) == pytest.approx(expected, rel=1e-6)


def test_a_net_that_is_its_own_head_is_refused_naming_model_head():
    with pytest.raises(ConfigError) as e:
        backbone_keys(nn.Linear(3, 2))
    assert e.value.key == "model.head"


@pytest.mark.parametrize("path", MERGE_CONFIGS, ids=lambda p: p.stem)
def test_a_merge_built_in_python_with_defaults_is_the_one_its_yaml_builds(path):
    """`TSVM()` in a notebook and `merge=tsvm` on the command line merge alike."""
    built = instantiate(OmegaConf.create({"seed": 0, "merge": OmegaConf.load(path)}).merge)
    defaults = type(built)(**({"mode": built.mode} if isinstance(built, AdaMerging) else {}))
    assert vars(defaults) == vars(built)


def test_joint_training_ties_a_backbone_declared_after_its_head():
    from runner.fuse.joint import tie_backbones

    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.body = nn.Linear(3, 2), nn.Linear(4, 3)
            set_head_name(self, "head")

    nets = {"a": HeadFirst(), "b": HeadFirst()}
    tie_backbones(nets)
    assert nets["b"].body.weight is nets["a"].body.weight and nets["b"].body.bias is nets["a"].body.bias
    assert nets["b"].head.weight is not nets["a"].head.weight


def test_joint_training_gives_the_backbone_its_lr_factor_and_the_heads_the_lr():
    from runner.fuse.joint import JointModule, tie_backbones

    nets = {t: Net(nn.Linear(4, 3), nn.Linear(3, 2)) for t in ("a", "b")}
    tie_backbones(nets)
    optimizer = JointModule(nets, name="adamw", lr=0.01, backbone_lr_factor=0.1).configure_optimizers()
    backbone, heads = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.001) and heads["lr"] == 0.01
    assert {id(p) for p in backbone["params"]} == {id(nets["a"].body.weight), id(nets["a"].body.bias)}
    assert len(heads["params"]) == 4
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]  # the default: none

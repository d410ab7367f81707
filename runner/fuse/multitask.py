"""Multi-task model merging (FusionBench's setting): one backbone from K task models.

One pretrained start theta_0; K tasks, each with a model fine-tuned from theta_0 with its own
classification head (tasks have different classes, so the heads differ in shape). A method merges the
BACKBONES only (every state-dict entry outside the final classifier layer, `backbone_keys`); each task
keeps its own head, and `task_net(task)` is that task's net with the merged backbone.

Floating-point backbone parameters get the method's merge, computed in float32 at least and cast back
to the parameter's dtype. Floating-point buffers (BatchNorm running statistics) are averaged over the
tasks and integer buffers copied from the first task, as in runner.fuse.merge: they are statistics of
activations, not trained weights. Task vectors tau_i = theta_i - theta_0.

Methods (each cites its paper; FusionBench's implementation is the reference, and each docstring says
in one line where this one follows or departs from it): Average, TaskArithmetic, TIES, DARE (these
reuse runner.fuse.merge), Fisher, RegMean, AdaMerging (these need every task's validation inputs),
ModelStock, TSVM, IsoC. A `scaling` of None (TaskArithmetic, TIES, DARE, TSVM, IsoC) is chosen from
SCALING_GRID by the mean over the tasks of each task's val accuracy (needs every task's inputs and
labels then; ties: the smaller value). Labels are used for nothing else.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn
from torch.func import functional_call

from runner.batches import Inputs, num_samples, take, to_device
from runner.device import device_of
from runner.errors import ConfigError, check
from runner.fuse.merge import SCALING_GRID, _wide, dare, parameter_names, ties
from runner.models.adapter import head_module, head_name
from runner.models.facts import copy_facts

BATCH = 64  # rows per forward pass where a method reads the tasks' inputs without gradients
Vectors = list[dict[str, Tensor]]  # one dict per task: parameter key -> tensor


@dataclass
class TaskModel:
    """One task of a pool: its fine-tuned net (backbone + its own head) and its validation data."""

    name: str  # task name
    net: nn.Module  # fine-tuned on this task: backbone + its own head
    inputs: Inputs | None = None  # the task's VALIDATION inputs (tensor or dict of tensors), unlabeled use
    labels: Tensor | None = None  # the task's validation labels (only for choosing a scaling on val)


def backbone_keys(net: nn.Module) -> list[str]:
    """State-dict keys of everything but the final classifier layer (runner.models.adapter.head_module:
    its qualified names found by identity in named_modules, the keys under them dropped)."""
    head = head_module(net)
    prefixes = [name for name, m in net.named_modules(remove_duplicate=False) if m is head]
    check(
        bool(prefixes) and "" not in prefixes,
        "model.head",
        head_name(net),
        f"a final classifier layer that is a submodule of {type(net).__name__}, below a backbone to merge",
    )
    return [k for k in net.state_dict() if not any(k.startswith(p + ".") for p in prefixes)]


# --- the pool a method merges --------------------------------------------------------------------


@dataclass
class Pool:
    """The backbones to merge, wide (float32 at least) and on the first task's device.

    keys: the floating-point backbone parameters, in state-dict order (tied ones under each name);
    start / thetas: theta_0 and each task's fine-tuned values of them; buffers: the backbone's buffers
    as merged (averaged, or the first task's integer ones); dtypes: each parameter's own dtype.
    """

    tasks: list[TaskModel]
    keys: list[str]
    start: dict[str, Tensor]
    thetas: Vectors
    buffers: dict[str, Tensor]
    dtypes: dict[str, torch.dtype]
    order: list[str]  # every backbone key, parameters and buffers, in state-dict order
    canonical: dict[str, str]  # parameter key -> the first name of its tensor (tied parameters share one)
    _vectors: Vectors | None = field(default=None, repr=False)

    @property
    def vectors(self) -> Vectors:
        """Task vectors tau_i = theta_i - theta_0 (computed once)."""
        if self._vectors is None:
            self._vectors = [{k: theta[k] - self.start[k] for k in self.keys} for theta in self.thetas]
        return self._vectors

    def state(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The merged backbone's state dict: `params` cast to their dtypes, and the merged buffers."""
        return {k: params[k].to(self.dtypes[k]) if k in params else self.buffers[k] for k in self.order}

    def functional(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """`state(params)` for torch.func.functional_call: one name per tied parameter."""
        return {k: v for k, v in self.state(params).items() if k not in self.canonical or self.canonical[k] == k}


def make_pool(start: Mapping[str, Tensor], tasks: list[TaskModel]) -> Pool:
    """The pool of `tasks` around `start` (checked by PoolMerge.fit)."""
    net = tasks[0].net
    order = backbone_keys(net)
    float_params = set(parameter_names(net))
    keys = [k for k in order if k in float_params]
    backbone = set(keys)
    names: dict[int, str] = {}  # each backbone tensor's first name among the keys (tied ones have several)
    for name, p in net.named_parameters(remove_duplicate=False):
        if name in backbone:
            names.setdefault(id(p), name)
    canonical = {name: names[id(p)] for name, p in net.named_parameters(remove_duplicate=False) if name in backbone}
    states = [t.net.state_dict() for t in tasks]
    thetas = [{k: _wide(s[k].detach()).to(states[0][k].device) for k in keys} for s in states]
    start_w = {k: _wide(start[k].detach()).to(states[0][k].device) for k in keys}
    buffers = {}
    for k in order:
        if k in float_params:
            continue
        v = states[0][k]
        if v.is_floating_point():
            buffers[k] = torch.stack([_wide(s[k].detach()).to(v.device) for s in states]).mean(0).to(v.dtype)
        else:
            buffers[k] = v.detach().clone()
    return Pool(tasks, keys, start_w, thetas, buffers, {k: states[0][k].dtype for k in keys}, order, canonical)


def task_arithmetic(
    start: Mapping[str, Tensor], vectors: Vectors, coefficient: Callable[[int, str], float]
) -> dict[str, Tensor]:
    """theta_0 + sum_i c_i(key) * tau_i per key: task arithmetic with one coefficient per task and key
    (TaskArithmetic: one for all; AdaMerging: fitted per task or per task and parameter tensor)."""
    return {k: start[k] + sum(coefficient(i, k) * tau[k] for i, tau in enumerate(vectors)) for k in start}


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(tensors)).mean(0)


# --- running the task nets -----------------------------------------------------------------------


@contextmanager
def _evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """`net` in eval mode (no dropout, BatchNorm on running statistics), its mode restored after."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def _logits(net: nn.Module, state: Mapping[str, Tensor], inputs: Inputs, batch_size: int = BATCH) -> Tensor:
    """`net`'s logits on `inputs` with the entries of `state` in place of its own (eval mode, no grad)."""
    device, out = device_of(net), []
    with torch.no_grad(), _evaluating(net):
        for i in range(0, num_samples(inputs), batch_size):
            x = to_device(take(inputs, slice(i, i + batch_size)), device)
            out.append(functional_call(net, dict(state), (x,)).float())
    return torch.cat(out)


def entropy(logits: Tensor) -> Tensor:
    """The mean Shannon entropy (nats) of the predictive distributions softmax(logits) over the rows."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1).mean()


def mean_entropy(net: nn.Module, inputs: Inputs, batch_size: int = BATCH) -> float:
    """The mean entropy of `net`'s predictions on `inputs` (AdaMerging's objective for one task)."""
    return float(entropy(_logits(net, {}, inputs, batch_size)))


def _accuracy(net: nn.Module, state: Mapping[str, Tensor], inputs: Inputs, labels: Tensor) -> float:
    return float((_logits(net, state, inputs).argmax(1).cpu() == labels.cpu()).double().mean())


# --- the contract -------------------------------------------------------------------------------


class PoolMerge:
    """Base class of multi-task merges (scikit-learn style): `__init__` validates parameters,
    `fit(start, tasks)` sets `merged_` (every backbone_keys entry, merged; on the CPU) and returns self,
    `task_net(task)` gives a task's net with the merged backbone, `stats()` what the fit chose.
    Subclasses implement `_merge(pool) -> {parameter key: merged value}`.
    """

    needs_inputs: ClassVar[bool] = False  # True: fit needs every task's `inputs` (Fisher, RegMean, AdaMerging)
    needs_labels: ClassVar[bool] = False  # True: fit needs labels (a scaling chosen by mean val accuracy)
    trains: ClassVar[bool] = False  # True: not fit but fit_training on the tasks' training data (runner.fuse.joint)

    def _why_data(self) -> str:
        """Why this method reads the tasks' validation data (for the error when some is missing)."""
        return f"{type(self).__name__} needs statistics of every task's data"

    def fit(self, start: Mapping[str, Tensor], tasks: Sequence[TaskModel]) -> PoolMerge:
        """Merge the backbones of `tasks`, fine-tuned from `start` (theta_0: the full state dict of task
        0's start; its head entries are ignored)."""
        tasks = list(tasks)
        self._check_tasks(start, tasks)
        pool = make_pool(start, tasks)
        params = self._merge(pool)
        params = {k: params[pool.canonical[k]] for k in pool.keys}  # tied names: one value
        self.merged_ = {k: v.detach().cpu() for k, v in pool.state(params).items()}
        self.tasks_ = [t.name for t in tasks]
        return self

    def _merge(self, pool: Pool) -> dict[str, Tensor]:
        raise NotImplementedError

    def task_net(self, task: TaskModel) -> nn.Module:
        """A deep copy of `task.net` with the merged backbone loaded (its own head kept), in eval mode."""
        _check_fitted(self, "merged_")
        net = copy_facts(task.net, copy.deepcopy(task.net))
        own = net.state_dict()
        wrong = [k for k, v in self.merged_.items() if k not in own or own[k].shape != v.shape]
        check(not wrong, f"tasks.{task.name}", f"backbone keys {wrong[:8]}", "a net of the merged backbone")
        net.load_state_dict(self.merged_, strict=False)
        return net.eval()

    def stats(self) -> dict[str, float]:
        """What the fit chose, e.g. {"merge/scaling": 0.3}; {} if nothing."""
        _check_fitted(self, "merged_")
        return {}

    def _check_tasks(self, start: Mapping[str, Tensor], tasks: list[TaskModel]) -> None:
        names = [t.name for t in tasks]
        check(len(tasks) >= 2, "tasks", names, "2 or more fine-tuned task models to merge")
        check(len(set(names)) == len(names), "tasks", names, "distinct task names")
        check_backbones(start, tasks)
        for t in tasks if self.needs_inputs or self.needs_labels else []:
            check(t.inputs is not None, f"tasks.{t.name}", None, f"validation inputs: {self._why_data()}")
            check(num_samples(t.inputs) > 0, f"tasks.{t.name}", "0 inputs", f"validation inputs: {self._why_data()}")
        for t in tasks if self.needs_labels else []:
            check(t.labels is not None, f"tasks.{t.name}", None, f"validation labels: {self._why_data()}")
            check(
                len(t.labels) == num_samples(t.inputs),
                f"tasks.{t.name}",
                f"{len(t.labels)} labels for {num_samples(t.inputs)} inputs",
                "one validation label per validation input",
            )

    def _params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._params().items())})"


def check_backbones(start: Mapping[str, Tensor], tasks: list[TaskModel]) -> None:
    """Every task's backbone (backbone_keys) has the names and shapes of the start's (the start's
    entries under task 0's head aside), and holds a floating-point parameter to merge."""
    net = tasks[0].net
    head = set(net.state_dict()) - set(backbone_keys(net))
    reference = {k: tuple(v.shape) for k, v in start.items() if k not in head}
    wrong = {}
    for t in tasks:
        state = t.net.state_dict()
        own = {k: tuple(state[k].shape) for k in backbone_keys(t.net)}
        bad = sorted(k for k in reference.keys() | own.keys() if own.get(k) != reference.get(k))
        if bad:
            wrong[t.name] = [f"{k}: {own.get(k)} (start: {reference.get(k)})" for k in bad[:8]]
    if wrong:
        raise ConfigError(
            "tasks (backbone)",
            wrong,
            "task models fine-tuned from the start: the same backbone keys and shapes as the start's",
        )
    check(
        bool(set(parameter_names(net)) & reference.keys()),
        "tasks (backbone)",
        f"{type(net).__name__} with no floating-point parameter outside its head",
        "a backbone with parameters to merge",
    )


def _check_fitted(method: PoolMerge, attribute: str) -> None:
    if not hasattr(method, attribute):
        raise NotFittedError(f"This {type(method).__name__} is not fitted yet: call fit(start, tasks) first.")


# --- parameter checks ----------------------------------------------------------------------------


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any, key: str, least: int, what: str) -> None:
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= least,
        key,
        value,
        f"an integer >= {least}: {what}",
    )


def _check_scaling(scaling: Any) -> None:
    check(
        scaling is None or (_real(scaling) and scaling > 0),
        "merge.scaling",
        scaling,
        f"null (chosen by the tasks' mean val accuracy from {list(SCALING_GRID)}) or a number > 0",
    )


def _check_density(density: Any) -> None:
    check(
        _real(density) and 0.0 < density <= 1.0,
        "merge.density",
        density,
        "a fraction in (0, 1]: the share of each task vector's entries kept",
    )


# --- task-vector merges with a scaling -----------------------------------------------------------


class _Scaled(PoolMerge):
    """theta_0 + scaling * direction(pool). scaling None: chosen from SCALING_GRID by the mean over the
    tasks of each task's val accuracy (ties: the smaller value). Fitted: `scaling_`, and with a chosen
    one `grid_val_acc_` (scaling -> mean val accuracy)."""

    scaling: float | None

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return self.scaling is None

    @property
    def needs_inputs(self) -> bool:  # type: ignore[override]
        return self.scaling is None

    def _why_data(self) -> str:
        return f"{type(self).__name__} with scaling null chooses it by the tasks' mean val accuracy"

    def direction(self, pool: Pool) -> dict[str, Tensor]:
        """The combined task vector, before `scaling`."""
        raise NotImplementedError

    def at_scaling(self, pool: Pool, direction: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
        """The merged parameters for one scaling."""
        return {k: pool.start[k] + scaling * direction[k] for k in pool.keys}

    def _merge(self, pool: Pool) -> dict[str, Tensor]:
        direction = self.direction(pool)
        if self.scaling is not None:
            self.scaling_, self.grid_val_acc_ = self.scaling, {}
        else:
            self.grid_val_acc_ = {s: mean_val_accuracy(pool, self.at_scaling(pool, direction, s)) for s in SCALING_GRID}
            self.scaling_ = max(SCALING_GRID, key=lambda s: (self.grid_val_acc_[s], -s))
        return self.at_scaling(pool, direction, self.scaling_)

    def stats(self) -> dict[str, float]:
        _check_fitted(self, "scaling_")
        out = {"merge/scaling": float(self.scaling_)}
        if self.grid_val_acc_:
            out["merge/val_acc"] = self.grid_val_acc_[self.scaling_]
        return out


def mean_val_accuracy(pool: Pool, params: Mapping[str, Tensor]) -> float:
    """The mean over the tasks of each task's val accuracy with the backbone `params` and its own head."""
    state = pool.functional(params)
    return sum(_accuracy(t.net, state, t.inputs, t.labels) for t in pool.tasks) / len(pool.tasks)


class Average(PoolMerge):
    """The simple average of the fine-tuned backbones (Wortsman et al. 2022, "Model soups"; FusionBench's
    simple_average). Follows FusionBench."""

    def _merge(self, pool: Pool) -> dict[str, Tensor]:
        return {k: _mean([theta[k] for theta in pool.thetas]) for k in pool.keys}


class TaskArithmetic(_Scaled):
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
    theta_0 + scaling * sum_i tau_i, computed as theta_0 + sum_i scaling * tau_i (so AdaMerging with its
    coefficients at `init` gives the same bits). Follows FusionBench (scaling_factor 0.3)."""

    def __init__(self, scaling: float | None = 0.3) -> None:
        _check_scaling(scaling)
        self.scaling = scaling

    def direction(self, pool: Pool) -> dict[str, Tensor]:
        return {}  # at_scaling reads the task vectors themselves

    def at_scaling(self, pool: Pool, direction: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
        return task_arithmetic(pool.start, pool.vectors, lambda i, k: scaling)


class TIES(_Scaled):
    """TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"):
    each backbone task vector trimmed to its top `density` fraction by magnitude (ranked over all its
    entries), a sign elected per entry, the disjoint mean (runner.fuse.merge.ties); theta_0 + scaling *
    that. Departs from FusionBench, whose default merge_func is the disjoint SUM: this is the paper's mean."""

    def __init__(self, density: float = 0.2, scaling: float | None = 0.3) -> None:
        _check_density(density)
        _check_scaling(scaling)
        self.density, self.scaling = density, scaling

    def direction(self, pool: Pool) -> dict[str, Tensor]:
        return ties(pool.vectors, self.density)


class DARE(_Scaled):
    """DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch"): every backbone task-vector entry dropped with probability `drop_rate`, the
    survivors rescaled by 1 / (1 - drop_rate) (runner.fuse.merge.dare, masks from a CPU generator seeded
    by `seed`), then summed (combine "sum", DARE-TA) or merged by TIES (combine "ties": trimmed to
    `density` if < 1, sign election, disjoint mean). Fitted `dropped_fraction_`. Departs from
    FusionBench's dare/ties_merging only in TIES' disjoint mean (it sums) and its default density (1.0:
    no trim after the drop, as in mergekit's dare_ties; FusionBench trims to 20%)."""

    COMBINE = ("sum", "ties")

    def __init__(
        self,
        drop_rate: float = 0.9,
        combine: str = "sum",
        density: float = 1.0,
        scaling: float | None = 0.3,
        seed: int = 0,
    ) -> None:
        check(_real(drop_rate) and 0.0 <= drop_rate < 1.0, "merge.drop_rate", drop_rate, "a probability in [0, 1)")
        check(combine in self.COMBINE, "merge.combine", combine, list(self.COMBINE))
        _check_density(density)
        check(
            combine == "ties" or density == 1.0,
            "merge.density",
            density,
            "1.0 with combine: sum (a trim density applies to combine: ties only)",
        )
        _check_scaling(scaling)
        _integer(seed, "merge.seed", 0, "the seed of the drop masks")
        self.drop_rate, self.combine, self.density, self.scaling, self.seed = drop_rate, combine, density, scaling, seed

    def direction(self, pool: Pool) -> dict[str, Tensor]:
        dropped, self.dropped_fraction_ = dare(pool.vectors, self.drop_rate, torch.Generator().manual_seed(self.seed))
        if self.combine == "ties":
            return ties(dropped, self.density)
        return {k: sum(tau[k] for tau in dropped) for k in pool.keys}

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "merge/dropped_fraction": float(self.dropped_fraction_)}


# --- Fisher merging ------------------------------------------------------------------------------


def fisher_average(states: Vectors, fishers: Vectors, eps: float = 1e-8) -> dict[str, Tensor]:
    """Per entry, sum_i (F_i + eps) theta_i / sum_i (F_i + eps): the Fisher-weighted average of the
    states (eps keeps it defined; where every F_i is 0 it is the plain average)."""
    out = {}
    for k in states[0]:
        weights = torch.stack([f[k] for f in fishers]) + eps
        out[k] = (weights * torch.stack([s[k] for s in states])).sum(0) / weights.sum(0)
    return out


def diagonal_fisher(net: nn.Module, inputs: Inputs, keys: Sequence[str]) -> dict[str, Tensor]:
    """The diagonal Fisher of `net` for the parameters `keys` on `inputs`: the mean over the rows of
    E_{y ~ p(y|x)} (d log p(y|x) / d theta)^2, the expectation over the model's own predictive
    distribution computed exactly (one backward pass per row and class; no label read, no sampling).
    Eval mode; the net and its gradients are left unchanged (torch.func.functional_call)."""
    named = dict(net.named_parameters())  # one name per tensor: the first
    first = {id(p): name for name, p in named.items()}
    aliases = {name: first[id(p)] for name, p in net.named_parameters(remove_duplicate=False)}
    own = list(dict.fromkeys(aliases[k] for k in keys))
    params = {k: named[k].detach().requires_grad_(True) for k in own}
    fisher = {k: torch.zeros_like(_wide(params[k])) for k in own}
    device, n = device_of(net), num_samples(inputs)
    with torch.enable_grad(), _evaluating(net):
        for row in range(n):
            x = to_device(take(inputs, slice(row, row + 1)), device)
            logp = torch.log_softmax(functional_call(net, params, (x,)).float(), -1)[0]
            p = logp.detach().exp()
            for c in range(len(logp)):
                grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True, allow_unused=True)
                for k, g in zip(own, grads):
                    if g is not None:
                        fisher[k] += p[c] * _wide(g) ** 2
    return {k: fisher[aliases[k]] / n for k in keys}


class Fisher(PoolMerge):
    """Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging"): per entry,
    sum_i F_i theta_i / sum_i F_i with F_i the diagonal Fisher of task i's net (its own head) on the
    first `num_examples` rows of its val inputs (`diagonal_fisher`: the exact expectation over the
    model's predictive distribution; `fisher_average`, eps added to every F_i). Departs from FusionBench:
    it squares the gradient of sum over classes AND rows of sqrt(p) log p (a batch's cross terms
    included), where this takes the per-row expectation; it also rescales each task's Fisher by its
    global L2 norm (normalize_fisher_weight), which `normalize: true` does here (F_i / ||F_i||)."""

    needs_inputs = True

    def __init__(self, num_examples: int = 256, eps: float = 1e-8, normalize: bool = False) -> None:
        _integer(num_examples, "merge.num_examples", 1, "the rows of each task's val inputs the Fisher averages")
        check(_real(eps) and eps > 0, "merge.eps", eps, "a number > 0 added to every Fisher entry")
        check(isinstance(normalize, bool), "merge.normalize", normalize, "true or false")
        self.num_examples, self.eps, self.normalize = num_examples, eps, normalize

    def _merge(self, pool: Pool) -> dict[str, Tensor]:
        fishers = []
        for t in pool.tasks:
            f = diagonal_fisher(t.net, take(t.inputs, slice(0, self.num_examples)), pool.keys)
            f = {k: v.to(pool.start[k].device) for k, v in f.items()}
            if self.normalize:
                norm = torch.sqrt(sum((v**2).sum() for v in f.values()))
                f = {k: v / norm.clamp(min=torch.finfo(v.dtype).tiny) for k, v in f.items()}
            fishers.append(f)
        return fisher_average(pool.thetas, fishers, self.eps)


# --- RegMean -------------------------------------------------------------------------------------


def regmean_solve(grams: Sequence[Tensor], weights: Sequence[Tensor], alpha: float) -> Tensor:
    """W* = (sum_i G_i)^-1 sum_i G_i W_i^T, transposed back to torch's (out, in) layout, with every G_i's
    off-diagonal entries scaled by `alpha`. Computed in float64 as the simple average plus the
    correction the data determines: input features no task ever feeds (a zero row and column of every
    G_i) keep the average; a system that LU finds singular (alpha = 1 with fewer rows than features,
    say) is solved by least squares (gelsd, on the CPU: the minimal change from the average)."""
    reduced = [alpha * g.double() + (1 - alpha) * torch.diag(torch.diagonal(g.double())) for g in grams]
    total = sum(reduced)
    mean = _mean([w.double() for w in weights]).T  # (in, out)
    residual = sum(g @ w.double().T for g, w in zip(reduced, weights)) - total @ mean
    active = torch.diagonal(total) > 0
    sub, rhs = total[active][:, active], residual[active]
    delta, info = torch.linalg.solve_ex(sub, rhs)
    if int(info) != 0 or not torch.isfinite(delta).all():
        delta = torch.linalg.lstsq(sub.cpu(), rhs.cpu(), driver="gelsd").solution.to(sub.device)
    out = mean.clone()
    out[active] += delta
    return out.T


def linear_grams(net: nn.Module, inputs: Inputs, names: Sequence[str]) -> dict[str, Tensor]:
    """For each nn.Linear `names` of `net`: G = X^T X / rows, X the inputs the layer receives while
    `net` runs on `inputs` (eval mode, forward pre-hooks), leading dimensions flattened into rows. With
    an `attention_mask` in dict inputs, a layer input of shape (batch, length, width) keeps only the
    rows of real tokens (mask != 0). A layer that never ran is absent."""
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    mask: list[Tensor | None] = [None]

    def hook(name: str):
        def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            m = mask[0]
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.to(x.device) != 0]
            x = _wide(x.reshape(-1, x.shape[-1]))
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return catch

    handles = [net.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    device = device_of(net)
    try:
        with torch.no_grad(), _evaluating(net):
            for i in range(0, num_samples(inputs), BATCH):
                x = to_device(take(inputs, slice(i, i + BATCH)), device)
                mask[0] = x.get("attention_mask") if isinstance(x, dict) else None
                net(x)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(rows[n], 1) for n in sums}


class RegMean(PoolMerge):
    """RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"): every
    nn.Linear weight of the backbone merged as argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 with X_i the
    inputs the layer receives when task i's own net runs on the first `num_examples` rows of task i's
    val inputs (`linear_grams`, `regmean_solve`; off-diagonal Gram entries scaled by `alpha`);
    everything else (biases, embeddings, LayerNorm, conv, a Linear that never runs, such as
    nn.MultiheadAttention's out_proj) the simple average. Follows FusionBench: Grams averaged over each
    task's rows (so every task weighs alike) and alpha as its reduce_non_diagonal_ratio; departs in
    counting only real tokens of padded text and solving (torch.linalg.solve) instead of inverting."""

    needs_inputs = True

    def __init__(self, alpha: float = 0.9, num_examples: int = 256) -> None:
        check(
            _real(alpha) and 0.0 <= alpha <= 1.0,
            "merge.alpha",
            alpha,
            "a number in [0, 1]: the scale of the Grams' off-diagonal",
        )
        _integer(num_examples, "merge.num_examples", 1, "the rows of each task's val inputs the Grams read")
        self.alpha, self.num_examples = alpha, num_examples

    def _merge(self, pool: Pool) -> dict[str, Tensor]:
        net = pool.tasks[0].net
        keys = set(pool.keys)
        names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in keys]
        grams = [linear_grams(t.net, take(t.inputs, slice(0, self.num_examples)), names) for t in pool.tasks]
        out = {k: _mean([theta[k] for theta in pool.thetas]) for k in pool.keys}
        self.regmean_layers_ = 0
        for n in names:
            if all(n in g for g in grams):
                device = pool.start[f"{n}.weight"].device
                weights = [theta[f"{n}.weight"] for theta in pool.thetas]
                solved = regmean_solve([g[n].to(device) for g in grams], weights, self.alpha)
                out[f"{n}.weight"] = solved.to(weights[0].dtype)
                self.regmean_layers_ += 1
        return out

    def stats(self) -> dict[str, float]:
        _check_fitted(self, "regmean_layers_")
        return {"merge/regmean_layers": float(self.regmean_layers_)}


# --- AdaMerging ----------------------------------------------------------------------------------


def _cycle(inputs: Inputs, batch_size: int, generator: torch.Generator) -> Iterator[Inputs]:
    """Batches of `inputs` for ever: each pass a fresh random order (from `generator`)."""
    n = num_samples(inputs)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            yield take(inputs, order[i : i + batch_size])


class AdaMerging(PoolMerge):
    """AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"):
    theta_0 + sum_i lambda_i tau_i with one lambda per task (mode "task") or per task and parameter
    tensor (mode "layer"), every lambda starting at `init` and fitted by Adam (`lr`, `steps` steps) to
    minimise the sum over the tasks of the mean entropy of task i's predictions (its own head, the merged
    backbone: torch.func.functional_call) on batches of `batch_size` rows of the first `num_examples`
    (None: all) of task i's UNLABELED val inputs, in a random order from `seed`. Fitted: `coefficients_`
    (task -> its lambdas), `entropy_init_` and `entropy_` (the objective on those rows before and after).
    Follows FusionBench (init 0.3, lr 1e-3, batch 16, entropy loss, no clamping), except that the nets
    run in eval mode (FusionBench adapts in train mode: dropout on) and 100 steps by default (its 1000)."""

    needs_inputs = True
    MODES = ("task", "layer")

    def __init__(
        self,
        mode: str = "task",
        steps: int = 100,
        lr: float = 1e-3,
        init: float = 0.3,
        num_examples: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        check(mode in self.MODES, "merge.mode", mode, list(self.MODES))
        _integer(steps, "merge.steps", 0, "Adam steps on the coefficients (0: they stay at init)")
        check(_real(lr) and lr > 0, "merge.lr", lr, "a number > 0: Adam's learning rate")
        check(_real(init), "merge.init", init, "a number: every coefficient's starting value (e.g. 0.3)")
        if num_examples is not None:
            _integer(num_examples, "merge.num_examples", 1, "the rows of each task's val inputs read (null: all)")
        _integer(batch_size, "merge.batch_size", 1, "rows of each task per step")
        _integer(seed, "merge.seed", 0, "the seed of the batches' order")
        self.mode, self.steps, self.lr, self.init = mode, steps, lr, init
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed

    def _merge(self, pool: Pool) -> dict[str, Tensor]:
        keys = [k for k in pool.keys if pool.canonical[k] == k]
        column = {k: j for j, k in enumerate(keys)}
        device = pool.start[keys[0]].device
        shape = (len(pool.tasks),) if self.mode == "task" else (len(pool.tasks), len(keys))
        lam = torch.full(shape, float(self.init), dtype=torch.float64, device=device, requires_grad=True)

        def merged(coefficients: Tensor) -> dict[str, Tensor]:
            c = coefficients if self.mode == "layer" else coefficients[:, None].expand(-1, len(keys))
            return {
                k: pool.start[k] + sum(c[i, column[k]].float() * tau[k] for i, tau in enumerate(pool.vectors))
                for k in keys
            }

        inputs = [take(t.inputs, slice(0, self.num_examples)) for t in pool.tasks]
        self.entropy_init_ = self._objective(pool, merged(lam.detach()), inputs)
        generator = torch.Generator().manual_seed(self.seed)
        batches = [_cycle(x, self.batch_size, generator) for x in inputs]
        optimizer = torch.optim.Adam([lam], lr=self.lr)
        nets = [t.net for t in pool.tasks]
        with torch.enable_grad():
            for _ in range(self.steps):
                grad = torch.zeros_like(lam)
                for net, batch in zip(nets, batches):  # one task at a time: one task's graph in memory
                    with _evaluating(net):
                        x = to_device(next(batch), device_of(net))
                        loss = entropy(functional_call(net, pool.functional(merged(lam)), (x,)))
                        grad += torch.autograd.grad(loss, [lam])[0]  # the lambdas only: the heads get no .grad
                lam.grad = grad
                optimizer.step()
        fitted = lam.detach().cpu()
        self.coefficients_ = {t.name: fitted[i].reshape(-1).tolist() for i, t in enumerate(pool.tasks)}
        table = fitted if self.mode == "layer" else fitted[:, None].expand(-1, len(keys))
        out = task_arithmetic(pool.start, pool.vectors, lambda i, k: float(table[i, column[pool.canonical[k]]]))
        self.entropy_ = self._objective(pool, out, inputs)
        return out

    @staticmethod
    def _objective(pool: Pool, params: Mapping[str, Tensor], inputs: list[Inputs]) -> float:
        """The sum over the tasks of the mean entropy of each task's predictions on its `inputs`."""
        state = pool.functional({k: v.detach() for k, v in params.items()})
        return sum(float(entropy(_logits(t.net, state, x))) for t, x in zip(pool.tasks, inputs))

    def stats(self) -> dict[str, float]:
        _check_fitted(self, "coefficients_")
        out = {f"merge/lambda/{name}": sum(c) / len(c) for name, c in self.coefficients_.items()}
        return {**out, "merge/entropy_init": self.entropy_init_, "merge/entropy": self.entropy_}


# --- Model Stock ---------------------------------------------------------------------------------


def model_stock_ratio(vectors: Sequence[Tensor]) -> float:
    """t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine similarity of the task vectors
    (clamped at 0, so t lies in [0, 1]; a zero vector has cosine 0 with every other)."""
    flat = [v.flatten().double() for v in vectors]
    pairs = [(a, b) for i, a in enumerate(flat) for b in flat[i + 1 :]]
    cosines = [float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0 for a, b in pairs]
    cos = max(0.0, sum(cosines) / len(cosines))
    n = len(vectors)
    return n * cos / (1 + (n - 1) * cos)


class ModelStock(PoolMerge):
    """Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"): per
    parameter tensor, t * mean_i(theta_i) + (1 - t) * theta_0 with t = N cos / (1 + (N - 1) cos) and cos
    the mean pairwise cosine similarity of the task vectors (`model_stock_ratio`). Departs from
    FusionBench: it averages the pairwise ANGLES and takes the cosine of that (the same for N = 2), and
    does not clamp cos at 0 (there a negative cos gives t < 0, unbounded as cos nears -1/(N-1))."""

    def _merge(self, pool: Pool) -> dict[str, Tensor]:
        self.ratios_ = {k: model_stock_ratio([tau[k] for tau in pool.vectors]) for k in pool.keys}
        return {
            k: self.ratios_[k] * _mean([theta[k] for theta in pool.thetas]) + (1 - self.ratios_[k]) * pool.start[k]
            for k in pool.keys
        }

    def stats(self) -> dict[str, float]:
        _check_fitted(self, "ratios_")
        return {"merge/ratio_mean": sum(self.ratios_.values()) / len(self.ratios_)}


# --- TSVM and Iso-C ------------------------------------------------------------------------------


def _nonzero(s: Tensor, shape: Sequence[int]) -> Tensor:
    """Which singular values `s` (descending) of a matrix of `shape` are nonzero (numerical rank, as
    torch.linalg.matrix_rank's default tolerance)."""
    if s.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=s.device)
    return s > s.max() * max(shape) * torch.finfo(s.dtype).eps


def _polar(a: Tensor) -> Tensor:
    """The orthogonal polar factor P Q^T of a = P S Q^T: the nearest matrix with orthonormal columns."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_merge(matrices: Sequence[Tensor]) -> Tensor:
    """TSV-Merge of 2-D task vectors: each one's top floor(rank / K) singular triplets (rank = the
    smaller dimension, K tasks; zero singular values dropped), the U's and V's concatenated and each
    replaced by its polar factor, U_orth diag(S_cat) V_orth^T. Where floor(rank / K) = 0: the mean."""
    k = min(matrices[0].shape) // len(matrices)
    if k == 0:
        return _mean(matrices)
    us, ss, vhs = [], [], []
    for m in matrices:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        keep = _nonzero(s[:k], m.shape)
        us.append(u[:, :k][:, keep])
        ss.append(s[:k][keep])
        vhs.append(vh[:k][keep])
    s = torch.cat(ss)
    if s.numel() == 0:
        return torch.zeros_like(matrices[0])
    return _polar(torch.cat(us, 1)) @ torch.diag(s) @ _polar(torch.cat(vhs, 0).T).T


class _Spectral(_Scaled):
    """Merges that treat each 2-D backbone parameter's task vectors as matrices (`matrices`), and every
    other parameter's by their mean; theta_0 + scaling * that."""

    def __init__(self, scaling: float | None = 1.0) -> None:
        _check_scaling(scaling)
        self.scaling = scaling

    def matrices(self, mats: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def direction(self, pool: Pool) -> dict[str, Tensor]:
        out = {}
        for k in pool.keys:
            mats = [tau[k] for tau in pool.vectors]
            out[k] = self.matrices(mats) if mats[0].dim() == 2 else _mean(mats)
        return out


class TSVM(_Spectral):
    """TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR): every 2-D backbone parameter merged by `tsv_merge`, every other one the mean of its
    task vectors; theta_0 + scaling * that. Follows FusionBench (compute_and_sum_svd_mem_reduction),
    departing where it is undefined: zero singular triplets are dropped before orthogonalising (their
    vectors are arbitrary), and a matrix whose rank is below K takes the mean (FusionBench: theta_0)."""

    def matrices(self, mats: list[Tensor]) -> Tensor:
        return tsv_merge(mats)


def iso_c(matrix: Tensor) -> Tensor:
    """Iso-C of a summed 2-D task vector M = U S V^T: mean(S) U V^T over M's nonzero singular values
    (the spectrum flattened to its mean: every direction of the common subspace equally scaled)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = _nonzero(s, matrix.shape)
    if not keep.any():
        return torch.zeros_like(matrix)
    return s[keep].mean() * u[:, keep] @ vh[keep]


class IsoC(_Spectral):
    """Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces"): every 2-D backbone parameter's summed task vector made isotropic (`iso_c`),
    every other parameter the mean of its task vectors; theta_0 + scaling * that. Follows FusionBench's
    iso_c, except that mean(S) runs over the nonzero singular values only (FusionBench: all min(m, n),
    with the arbitrary singular vectors of zero ones; the same for a full-rank sum)."""

    def matrices(self, mats: list[Tensor]) -> Tensor:
        return iso_c(sum(mats))

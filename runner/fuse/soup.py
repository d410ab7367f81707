"""Weight averaging: uniform and greedy model soups (Wortsman et al. 2022).

Averaging weights only works for networks fine-tuned from one shared starting checkpoint (they
stay in one loss basin); independently initialised nets average to a broken model (measured
here: 9% on MNIST-1D). The runner records each member's `init_id`, a hash of its initial weights
(runner.models.facts), and soups refuse members whose architectures or init_ids differ.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from runner.fuse.base import Fusion, LogSoftmaxNet, check_is_fitted
from runner.models.facts import copy_facts

SOUP_REQUIREMENT = (
    "weight averaging (model soups) needs members of one architecture fine-tuned from one shared "
    "initial checkpoint (equal `init_id`); use ensemble=soup5 (a shared, pre-trained start) or `ensemble.shared_init: true` "
    "(every seed then starts from the same weights), or an output-level strategy such as fuse=mean"
)


def average_state(nets: list[nn.Module]) -> dict[str, Tensor]:
    states = [n.state_dict() for n in nets]
    return {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone()
        for k, v in states[0].items()
    }


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((net.eval()(x).argmax(1) == y).float().mean())


class _Soup(Fusion):
    requires = frozenset({"one_architecture", "shared_start"})
    requirement = SOUP_REQUIREMENT

    def _soup(self, members: list[nn.Module], ingredients: list[int]) -> nn.Module:
        soup = copy_facts(members[ingredients[0]], copy.deepcopy(members[ingredients[0]]))
        soup.load_state_dict(average_state([members[i] for i in ingredients]))
        return soup.eval()

    def predict_proba(self, x: Tensor) -> Tensor:
        check_is_fitted(self, "soup_")
        with torch.no_grad():
            return torch.softmax(self.soup_.eval()(x).float(), 1)

    def as_module(self) -> nn.Module:
        check_is_fitted(self, "soup_")
        return LogSoftmaxNet(self.soup_)

    def stats(self) -> dict[str, float]:
        check_is_fitted(self, "soup_")
        return {"fuse/ingredients": float(len(self.ingredients_))} if hasattr(self, "ingredients_") else {}


class UniformSoup(_Soup):
    """The average of all members' weights."""

    def _fit(self, members: list[nn.Module], x: Tensor, y: Tensor) -> None:
        self.ingredients_ = list(range(len(members)))
        self.soup_ = self._soup(members, self.ingredients_)
        self.member_val_acc_ = [accuracy(m, x, y) for m in members]
        self.val_acc_ = accuracy(self.soup_, x, y)


class GreedySoup(_Soup):
    """Members in decreasing val accuracy; each joins the soup if val accuracy does not drop."""

    def _fit(self, members: list[nn.Module], x: Tensor, y: Tensor) -> None:
        self.member_val_acc_ = [accuracy(m, x, y) for m in members]
        order = sorted(range(len(members)), key=lambda i: -self.member_val_acc_[i])
        ingredients, soup, best = [order[0]], members[order[0]], self.member_val_acc_[order[0]]
        for i in order[1:]:
            candidate = self._soup(members, ingredients + [i])
            acc = accuracy(candidate, x, y)
            if acc >= best:
                ingredients, soup, best = ingredients + [i], candidate, acc
        self.ingredients_ = ingredients
        self.soup_ = self._soup(members, ingredients) if len(ingredients) == 1 else soup
        self.val_acc_ = best

"""Feature-level fusion: a head trained on the concatenated features of frozen members."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runner.data import TensorBatches
from runner.errors import check
from runner.fuse.base import check_is_fitted, Fusion, LogSoftmaxNet
from runner.models import Net

HEADS = ("linear", "mlp")


class FeatureNet(Net):
    """Members' forward_features concatenated, then one head."""

    def __init__(self, members: list[nn.Module], head: nn.Module) -> None:
        super().__init__(members[0].in_features, members[0].num_classes)
        self.members, self.head = nn.ModuleList(members), head
        self.feature_dim = sum(m.feature_dim for m in members)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], 1)


class FeatureFusion(Fusion):
    """Concatenate frozen members' features and train a head (Linear or a small MLP) on val.

    A linear head starts, with `init_from_members`, as the members' own heads side by side,
    scaled by 1/M: the mean of member logits, which training on val then refines.
    `finetune_members` adds a second phase that trains members and head jointly at
    `finetune_lr` (linear probe then fine-tune); members are copied first, never changed.
    """

    def __init__(self, head: str = "linear", hidden: int = 128, epochs: int = 50, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 100, init_from_members: bool = True,
                 finetune_members: bool = False, finetune_epochs: int = 10, finetune_lr: float = 1e-4,
                 seed: int = 0) -> None:
        check(head in HEADS, "fuse.head", head, list(HEADS))
        for key, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size),
                           ("finetune_epochs", finetune_epochs)):
            check(int(value) >= 1, f"fuse.{key}", value, "an integer >= 1")
        check(lr > 0 and finetune_lr > 0, "fuse.lr / fuse.finetune_lr", (lr, finetune_lr), "floats > 0")
        check(weight_decay >= 0, "fuse.weight_decay", weight_decay, "a float >= 0")
        self.head, self.hidden, self.epochs, self.lr = head, hidden, epochs, lr
        self.weight_decay, self.batch_size, self.init_from_members = weight_decay, batch_size, init_from_members
        self.finetune_members, self.finetune_epochs, self.finetune_lr = finetune_members, finetune_epochs, finetune_lr
        self.seed = seed

    def check_members(self, members) -> None:
        super().check_members(members)
        missing = [f"{i}:{type(m).__name__}" for i, m in enumerate(members)
                   if not (hasattr(m, "forward_features") and hasattr(m, "feature_dim"))]
        check(not missing, "ensemble.members", missing, "nets with forward_features and feature_dim (runner.models.Net)")

    def _build_head(self, members: list[nn.Module]) -> nn.Module:
        width, classes = sum(m.feature_dim for m in members), members[0].num_classes
        if self.head == "mlp":
            return nn.Sequential(nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, classes))
        head = nn.Linear(width, classes)
        if self.init_from_members and all(isinstance(getattr(m, "head", None), nn.Linear) for m in members):
            with torch.no_grad():
                head.weight.copy_(torch.cat([m.head.weight for m in members], 1) / len(members))
                head.bias.copy_(torch.stack([m.head.bias for m in members]).mean(0))
        return head

    def _train(self, net: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float) -> None:
        # A plain loop: on a few hundred val rows a Lightning Trainer added ~25 ms of overhead
        # per step here (5.7 s for 50 epochs of a linear head on 400 rows).
        optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=self.weight_decay)
        batches = TensorBatches(x, y, self.batch_size, shuffle=True, seed=self.seed)
        net.train()
        for _ in range(epochs):
            for xb, yb in batches:
                loss = F.cross_entropy(net(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.eval()

    def _fit(self, members: list[nn.Module], x: Tensor, y: Tensor) -> None:
        if self.finetune_members:
            members = [copy.deepcopy(m) for m in members]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = FeatureNet([m.eval() for m in members], self._build_head(members))
            device = next(net.parameters()).device
            net.head.to(device)
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                features = net.forward_features(x)
            self._train(net.head, features, y, self.epochs, self.lr)
            if self.finetune_members:
                self._train(net, x, y, self.finetune_epochs, self.finetune_lr)
        self.net_ = net.eval()

    def predict_proba(self, x: Tensor) -> Tensor:
        check_is_fitted(self, "net_")
        with torch.no_grad():
            return torch.softmax(self.net_(x).float(), 1)

    def as_module(self) -> nn.Module:
        check_is_fitted(self, "net_")
        return LogSoftmaxNet(self.net_)

"""Use the models a job made: `runner.load(uri)` brings one back from MLflow, ready to predict.

Every evaluated model (member, fused, compressed, fused_compressed) is an MLflow LoggedModel of its
child run when `tracking.log_models` is true (the default). The module comes back exactly as it was
evaluated, its own forward included: members and compressed members return logits, fused models
log-probabilities. `predict_proba` turns either into probabilities the way the evaluation did, so
it gives the `predictions/test.npz` the run logged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runner.data.batches import Inputs

DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"  # conf/tracking/local.yaml


@dataclass
class ShippedModel:
    """A logged model: `model` (nn.Module, eval mode, CPU), the input it expects and where it came from.

    `input_example` holds the first test inputs it was logged with (a numpy array, or a dict of
    them for token inputs): their shape after the batch dimension and their dtype are what the
    model takes; `signature` is MLflow's description of inputs and outputs.
    """
    model: nn.Module
    model_uri: str
    run_id: str | None
    input_example: Any
    signature: Any

    @torch.no_grad()
    def predict_proba(self, x: Inputs | Any) -> torch.Tensor:
        """Class probabilities (float64, as the evaluation computes them) for a batch of inputs."""
        if isinstance(x, dict):
            x = {k: torch.as_tensor(v) for k, v in x.items()}
        else:
            x = torch.as_tensor(x)
        return torch.softmax(self.model(x).double(), dim=1)

    def __call__(self, x: Inputs) -> torch.Tensor:
        return self.model(x)


def load(uri: str, tracking_uri: str | None = None) -> ShippedModel:
    """A logged model, from its `models:/<model_id>` URI, a registered version (`models:/<name>@<alias>`,
    `models:/<name>/<version>`) or the run id of its child run.

    `tracking_uri` defaults to $MLFLOW_TRACKING_URI, else the default local store
    (sqlite:///outputs/mlflow.db). Loading unpickles the module, so the classes it is made of
    (runner's, or your own) must be importable.
    """
    from runner.tracking.models import load_logged_model

    found = load_logged_model(uri, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    return ShippedModel(found.model, found.model_uri, found.run_id, found.input_example, found.signature)

"""Use the models a job made: `runner.load(uri)` brings one back from MLflow, ready to predict.

Every evaluated model (member, fused, compressed, fused_compressed) is an MLflow LoggedModel of its
child run when `tracking.log_models` is true (the default). The module comes back exactly as it was
evaluated, its own forward included: members and compressed members return logits, fused models
log-probabilities. `predict_proba` turns either into probabilities the way the evaluation did, so
it gives the `predictions/test.npz` the run logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from runner.batches import Inputs
from runner.tracking.models import load_logged_model

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
    meta: dict = field(default_factory=dict)  # what it was logged with: class names, its tokenizer
    raw_inputs: Any = None  # raw table rows (a DataFrame) -> model inputs, fitted on train (data=table)

    @property
    def classes(self) -> list[str]:
        """The class names in output order ([] where the data had none)."""
        return list(self.meta.get("classes") or [])

    def tokenizer(self) -> Any:
        """A text model's tokenizer (its pretrained one, or the one its data source trained); None otherwise."""
        if self.meta.get("tokenizer_json"):
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer.from_str(self.meta["tokenizer_json"]), pad_token="[PAD]"
            )
        if self.meta.get("tokenizer"):
            from runner.data.text import load_tokenizer  # here: it imports transformers (seconds), for text models only

            return load_tokenizer(self.meta["tokenizer"])
        return None

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Raw texts as the model's token inputs: its tokenizer, its length, padded and truncated."""
        tokenizer = self.tokenizer()
        if tokenizer is None:
            raise TypeError("this model was logged without a tokenizer: it does not take raw texts")
        length = int(self.meta.get("max_length") or next(iter(self.input_example.values())).shape[1])
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return {k: enc[k].long() for k in self.input_example}

    def predict(self, x: Inputs | Any) -> list:
        """The predicted class of each input: its name where the classes have names, else its index. Raw
        texts (a list of str) are tokenized first."""
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
            x = self.encode(list(x))
        elif self.raw_inputs is not None and hasattr(x, "columns"):  # raw table rows
            x = torch.from_numpy(self.raw_inputs(x))
        index = self.predict_proba(x).argmax(1).tolist()
        names = self.classes
        return [names[i] for i in index] if names else index

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
    found = load_logged_model(uri, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    return ShippedModel(
        found.model, found.model_uri, found.run_id, found.input_example, found.signature, found.meta, found.raw_inputs
    )

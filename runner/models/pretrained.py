"""Pretrained text encoders with a new classification head: sentence-transformers checkpoints.

A sentence-transformers folder is a Hugging Face model plus the pooling it was trained with
(`modules.json`, `1_Pooling/config.json`, an optional Normalize module). `SentenceEncoder` loads
the encoder with transformers, pools as the checkpoint says (so its features are the checkpoint's
sentence embeddings; tests compare them with `SentenceTransformer.encode`), and puts a new Linear
head on top. The tokenizer is the checkpoint's: the model config's `tokenizer` key is what the text
data sources read (`${model.tokenizer}`), so the user names the weights once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.errors import ConfigError, check
from runner.models.nets import seeded_head
from runner.packages import resolve_weights

POOLINGS = ("mean", "cls", "max")


def check_complete(info: Mapping[str, Any], key: str, value: Any) -> None:
    """transformers fills the weights a checkpoint lacks with random ones and only warns (`info`:
    from_pretrained's output_loading_info); here a missing or mismatched weight is a ConfigError."""
    problems = {what: sorted(map(str, info.get(what) or [])) for what in ("missing_keys", "mismatched_keys")}
    check(
        not any(problems.values()),
        key,
        value,
        "a checkpoint with every weight of its architecture: "
        + "; ".join(
            f"{what.replace('_', ' ')} ({len(names)}): {names[:8]}" for what, names in problems.items() if names
        ),
    )


def checkpoint_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling mode, normalize) of a sentence-transformers folder; ("cls", False) for a plain
    Hugging Face folder (BERT's own [CLS] representation)."""
    config = folder / "1_Pooling" / "config.json"
    modules = folder / "modules.json"
    if not config.is_file():
        return "cls", False
    settings = json.loads(config.read_text())
    mode = next(
        (m for m in POOLINGS if settings.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")),
        "mean",
    )
    normalize = modules.is_file() and any(
        m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text())
    )
    return mode, normalize


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per text from the token states (B, L, D) over the real tokens (mask 1)."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """A pretrained Transformer encoder, pooled as its checkpoint says, and a new Linear head.

    `weights`: a local folder, "pkg:<module>/<folder>" (a folder inside an installed package, e.g.
    the `pretrained` extra's MiniLM) or a Hugging Face hub name (needs internet). `pretrained=false`
    builds the same architecture with random weights (the from-scratch baseline). `pooling` and
    `normalize` default to the checkpoint's (MiniLM: mean over tokens, then L2-normalised for cosine
    similarity; conf/model/minilm.yaml turns the normalisation off: a new head on unit-length features
    learns slowly, its logits bounded by its weights' norm (2 epochs on Rotten Tomatoes: train loss
    0.54 with it at a 10x head lr, 0.38 without)).
    `tokenizer` names the tokenizer the data must use (the model YAML sets it to the weights).
    `head_seed` initialises the new head (null: the member's seed), so every fine-tune starts from
    one set of weights. Input: a dict with input_ids and attention_mask (B, L); `forward_features` gives the pooled
    embedding, `forward_head` the logits.
    """

    def __init__(
        self,
        num_classes: int,
        weights: str,
        pretrained: bool = True,
        pooling: str | None = None,
        normalize: bool | None = None,
        dropout: float = 0.1,
        tokenizer: str | None = None,
        max_length: int | None = None,
        head_seed: int | None = 0,
    ) -> None:
        super().__init__()
        check(isinstance(num_classes, int) and num_classes >= 2, "model.num_classes", num_classes, "an integer >= 2")
        check(pooling is None or pooling in POOLINGS, "model.pooling", pooling, ["null (the checkpoint's)", *POOLINGS])
        check(isinstance(pretrained, bool), "model.pretrained", pretrained, [True, False])
        check(0.0 <= dropout < 1.0, "model.dropout", dropout, "a float in [0, 1)")
        folder = resolve_weights(weights, "model.weights")
        self.encoder = self._load(folder, weights, pretrained)
        found_pooling, found_normalize = checkpoint_pooling(Path(folder)) if Path(folder).is_dir() else ("cls", False)
        self.pooling = pooling or found_pooling
        self.normalize = found_normalize if normalize is None else bool(normalize)
        self.feature_dim = int(self.encoder.config.hidden_size)
        self.num_classes, self.weights, self.tokenizer, self.max_length = num_classes, weights, tokenizer, max_length
        # what a logged model needs to take raw texts (runner.predict): its tokenizer and length
        self.preprocessing = {"tokenizer": tokenizer or weights, "max_length": max_length}
        self.dropout = nn.Dropout(dropout)
        self.head = seeded_head(self.feature_dim, num_classes, head_seed if pretrained else None)

    @staticmethod
    def _load(folder: str, weights: str, pretrained: bool) -> nn.Module:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "some weights were not used" (the MLM head) etc.
        try:
            if not pretrained:
                config = transformers.AutoConfig.from_pretrained(folder)
                return transformers.AutoModel.from_config(config, add_pooling_layer=False)
            model, info = transformers.AutoModel.from_pretrained(
                folder, add_pooling_layer=False, output_loading_info=True
            )
        except Exception as e:  # noqa: BLE001 - no config, truncated or corrupt weights, an unknown hub name...
            raise ConfigError(
                "model.weights",
                weights,
                "a sentence-transformers or Hugging Face encoder folder "
                f"with config.json and weights ({type(e).__name__}: {str(e).splitlines()[0]})",
            ) from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        check_complete(info, "model.weights", weights)
        return model

    def forward_features(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(x, Mapping):
            raise TypeError(f"a text encoder takes a dict with input_ids and attention_mask, got {type(x).__name__}")
        ids = x["input_ids"]
        mask = x.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden, mask, self.pooling)
        return nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

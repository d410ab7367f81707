"""Text classifiers on token ids: a fastText-style bag of embeddings."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from runner.errors import check
from runner.models.nets import Net


class BagOfEmbeddings(Net):
    """fastText-style classifier (Joulin et al. 2017): the mean of the token embeddings over the
    real (attention_mask == 1) tokens is the feature vector, a Linear head classifies it.

    Input: a dict with "input_ids" (int64, B x L) and "attention_mask" (B x L); without a mask,
    id 0 (the padding id) marks padding. `in_features` is the vocabulary size (the token-id range).
    """

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 64) -> None:
        check(
            isinstance(vocab_size, int) and vocab_size >= 2,
            "model.vocab_size",
            vocab_size,
            "an integer >= 2 (id 0 is padding)",
        )
        super().__init__(vocab_size, num_classes)
        check(isinstance(dim, int) and dim >= 1, "model.dim", dim, "an integer >= 1")
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.feature_dim = dim
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(x, Mapping):
            raise TypeError(f"BagOfEmbeddings takes a dict with input_ids and attention_mask, got {type(x).__name__}")
        ids = x["input_ids"]
        mask = x.get("attention_mask")
        mask = (ids != 0) if mask is None else mask.bool()
        weights = mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        summed = (self.embedding(ids) * weights).sum(1)
        # an all-padding row gets the zero vector rather than 0/0
        return summed / weights.sum(1).clamp_min(1.0)

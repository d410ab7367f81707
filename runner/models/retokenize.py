"""A text model that takes another tokenizer's token ids: the ids are decoded to texts by the tokenizer
that made them and encoded by the model's own.

What makes distillation across tokenizers work (SmolLM2, 49,152 byte-level BPE tokens, teaching MiniLM,
30,522 lowercase WordPiece tokens): every model of a job takes the job's inputs, the data's token ids
made by the member's tokenizer; a student with a tokenizer of its own (its `preprocessing`) is wrapped so
it reads those inputs as the same texts. Decoding is lossless for byte-level BPE tokenizers (SmolLM2's,
GPT-2's) and returns the normalised text for WordPiece ones (lowercased, accents stripped: what a
lowercasing student would have seen anyway). Texts longer than the source's `max_length` were cut
there before the student sees them.

The wrapped model is what is logged: its `preprocessing` is the source tokenizer's (runner.predict
tokenizes raw texts with it, and the wrapper re-encodes them), and it pickles with the two tokenizers'
names only (loaded again, once per process, when first used).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn


@lru_cache(maxsize=8)
def _tokenizer(spec: str) -> Any:
    from runner.data.text import load_tokenizer  # imports transformers (seconds)

    tokenizer = load_tokenizer(spec, "model.tokenizer")
    tokenizer.padding_side = "right"
    return tokenizer


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """What a model says its inputs need (`model.preprocessing`: a pretrained tokenizer and length, an image
    size and normalisation); {} for a model that takes the data's inputs as they come."""
    return dict(getattr(model, "preprocessing", None) or {})


def tokenizer_of(model: nn.Module) -> str | None:
    """The tokenizer a model's inputs must come from (its `preprocessing`), or None if it takes any ids."""
    spec = preprocessing(model).get("tokenizer")
    return str(spec) if spec else None


class Retokenized(nn.Module):
    """`model` (its own tokenizer `target`, up to `max_length` tokens) on the token ids of tokenizer
    `source`: input_ids and attention_mask (B, L) -> the model's logits (B, C)."""

    def __init__(
        self, model: nn.Module, source: str, target: str, max_length: int | None, source_max_length: int | None = None
    ) -> None:
        super().__init__()
        self.model, self.source, self.target, self.max_length = model, source, target, max_length
        self.preprocessing = {"tokenizer": source, "max_length": source_max_length}

    def texts(self, x: dict[str, Tensor]) -> list[str]:
        """The texts the source tokenizer's ids stand for (padding dropped by the attention mask)."""
        ids = [row[mask.bool()].tolist() for row, mask in zip(x["input_ids"].cpu(), x["attention_mask"].cpu())]
        return _tokenizer(self.source).batch_decode(ids, skip_special_tokens=True)

    def encode(self, texts: list[str], device: torch.device) -> dict[str, Tensor]:
        enc = _tokenizer(self.target)(
            texts, padding=True, truncation=self.max_length is not None, max_length=self.max_length, return_tensors="pt"
        )
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.model(self.encode(self.texts(x), x["input_ids"].device))


def retokenized(model: nn.Module, source: nn.Module) -> nn.Module:
    """`model` wrapped to take `source`'s inputs when the two need different tokenizers, else `model`."""
    mine, theirs = tokenizer_of(model), tokenizer_of(source)
    if mine is None or theirs is None or mine == theirs:
        return model
    return Retokenized(
        model, theirs, mine, preprocessing(model).get("max_length"), preprocessing(source).get("max_length")
    )

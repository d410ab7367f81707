"""Text classification from a file: a text column and a label column, as token ids.

The tokenizer is either loaded (`tokenizer`: a Hugging Face name or local directory) or a
WordPiece tokenizer trained here on the training split's texts; both are transformers
tokenizers, so the encoding is the same call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from runner.data.base import Split
from runner.data.table import FileData, require_columns
from runner.errors import ConfigError, check
from runner.packages import read_gguf_once, require_modules, resolve_gguf

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # in id order: [PAD] is 0, what models take as padding
DEFAULT_VOCAB_SIZE = 8000


def _bert_style(model: models.Model, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _inner_characters(tokenizer: Tokenizer, texts: Iterable[str]) -> list[str]:
    """The sorted characters that occur after the first of a word (as the trainer splits words)."""
    chars: set[str] = set()
    for text in texts:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
            chars.update(word[1:])
    return sorted(chars)


def train_wordpiece(
    texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE, lowercase: bool = True, max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on `texts`: [PAD]=0, [UNK], [CLS] and [SEP] around
    every text, [MASK]. At most `vocab_size` tokens, unless the special tokens and the characters
    of the texts alone are more. The same texts give the same vocabulary and ids."""
    learner = _bert_style(models.WordPiece(unk_token=UNK), lowercase)
    # tokenizers numbers the "##x" pieces in hash-map order, which breaks ties between merges
    # differently from run to run (huggingface/tokenizers#1794): registered first, in sorted
    # order, they get the same ids every time. They are special tokens to the trainer only: the
    # tokenizer returned is rebuilt from the learnt vocabulary, with just the real special tokens.
    pieces = ["##" + c for c in _inner_characters(learner, texts)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + pieces, show_progress=False
    )
    learner.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = _bert_style(models.WordPiece(vocab=learner.get_vocab(), unk_token=UNK), lowercase)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tokenizer.token_to_id(CLS)), (SEP, tokenizer.token_to_id(SEP))],
    )
    tokenizer.decoder = decoders.WordPiece()
    extra = {} if max_length is None else {"model_max_length": max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP, mask_token=MASK, **extra
    )


def load_tokenizer(name: str, key: str = "data.tokenizer") -> Any:
    """transformers' AutoTokenizer for `name` (a Hub name, a local directory, "pkg:<module>/<folder>":
    a folder inside an installed package, or a GGUF file, which carries its tokenizer: a path ending in
    .gguf or "<folder or hub name>::<file>.gguf", see runner.packages.resolve_gguf); one without a
    padding token pads with its end-of-sequence token (GPT-2 style). `key` names the option in errors."""
    from transformers import AutoTokenizer

    name, gguf_file = resolve_gguf(name, key)
    if gguf_file is not None:
        require_modules(["gguf"], key, f"{name}/{gguf_file}", "llm")
    elif name.startswith(("/", "./", "../", "~")):  # a directory; else transformers reads it as a Hub name
        name = str(Path(name).expanduser())
        check(
            Path(name).is_dir(),
            key,
            name,
            "an existing directory (saved by save_pretrained) or a Hub name",
        )
    try:
        if gguf_file is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
        else:  # a GGUF's vocabulary takes seconds to parse: once per process and file
            tokenizer = read_gguf_once(
                "tokenizer", name, gguf_file, lambda: AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)
            )
    except Exception as e:  # noqa: BLE001 - offline, unknown name, missing files, a missing backend...
        raise ConfigError(
            key,
            name if gguf_file is None else f"{name}/{gguf_file}",
            "a tokenizer AutoTokenizer.from_pretrained can load"
            + (", or null to train one on the training texts" if key.startswith("data.") else "")
            + f" ({type(e).__name__}: {e})",
        ) from e
    if tokenizer.pad_token is None:
        check(
            tokenizer.eos_token is not None,
            key,
            name,
            "a tokenizer with a padding or an end-of-sequence token",
        )
        log.info(
            "data: tokenizer %s has no padding token; padding with its end-of-sequence token %r",
            name,
            tokenizer.eos_token,
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TextData(FileData):
    """Texts (`text` column) and labels (`label` column) of a .csv, .tsv, .parquet, .json or .jsonl
    file, as {"input_ids", "attention_mask"} int64 arrays of `max_length` tokens ([CLS] first,
    padded, truncated).

    Without `tokenizer`, a WordPiece tokenizer of up to `vocab_size` (default 8000) tokens is
    trained on the training split's texts (`lowercase` applies to it). After `setup()`,
    `tokenizer` is the transformers tokenizer and `vocab_size` its real size (len(tokenizer)),
    which models read as ${data.vocab_size} (see `config_values`). Splits and labels as in
    runner.data.table.FileData; `scaling` must stay none.
    """

    name = "text"

    def __init__(
        self,
        path: str,
        text: str,
        label: str,
        tokenizer: str | None = None,
        vocab_size: int | None = None,
        max_length: int = 64,
        lowercase: bool = True,
        test_path: str | None = None,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("scaling", "none")
        check(
            kwargs["scaling"] == "none", "data.scaling", kwargs["scaling"], "none (texts become token ids, not scaled)"
        )
        check(isinstance(text, (str, int)), "data.text", text, "the name of the text column")
        check(
            tokenizer is None or (isinstance(tokenizer, str) and tokenizer),
            "data.tokenizer",
            tokenizer,
            "null (train a WordPiece tokenizer here) or a transformers tokenizer name or directory",
        )
        check(
            vocab_size is None or (isinstance(vocab_size, int) and vocab_size > len(SPECIAL_TOKENS)),
            "data.vocab_size",
            vocab_size,
            f"null or an integer > {len(SPECIAL_TOKENS)}",
        )
        check(
            isinstance(max_length, int) and max_length >= 3,
            "data.max_length",
            max_length,
            "an integer >= 3 ([CLS], a token, [SEP])",
        )
        check(isinstance(lowercase, bool), "data.lowercase", lowercase, [True, False])
        super().__init__(path, label, test_path, test_fraction, **kwargs)
        self.text, self.tokenizer_name, self.max_length, self.lowercase = text, tokenizer, max_length, lowercase
        self.requested_vocab_size = vocab_size
        self.vocab_size = vocab_size  # the tokenizer's real size after setup()
        self.tokenizer: Any = None

    def read(self) -> dict[str, pd.DataFrame]:
        frames = super().read()
        sources = self.sources()
        for split, frame in frames.items():
            require_columns(frame, [self.text], "data.text", self.text, sources[split])
        return frames

    def inputs(self, frame: pd.DataFrame) -> list[str]:
        return frame[self.text].fillna("").astype(str).tolist()

    def build_tokenizer(self, texts: Sequence[str]) -> Any:
        """The loaded tokenizer, or one trained on `texts` (the training split's)."""
        if self.tokenizer_name is None:
            return train_wordpiece(
                texts, self.requested_vocab_size or DEFAULT_VOCAB_SIZE, self.lowercase, self.max_length
            )
        if self.requested_vocab_size is not None:
            log.warning(
                "data.vocab_size=%s is ignored: the loaded tokenizer %s has its own vocabulary",
                self.requested_vocab_size,
                self.tokenizer_name,
            )
        return load_tokenizer(self.tokenizer_name)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids and attention masks, int64 arrays of shape (len(texts), max_length)."""
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_token_type_ids=False,
        )
        return {
            key: np.asarray(encoded[key], dtype=np.int64).reshape(len(texts), self.max_length)
            for key in ("input_ids", "attention_mask")
        }

    def preprocess(self, splits: dict[str, Split]) -> dict[str, Split]:
        self.tokenizer = self.build_tokenizer(splits["train"][0])
        self.vocab_size = len(self.tokenizer)
        return {split: (self.encode(texts), y) for split, (texts, y) in splits.items()}

    def config_values(self) -> dict[str, Any]:
        """What model configs interpolate: ${data.vocab_size}, ${data.max_length}."""
        return {"vocab_size": self.vocab_size, "max_length": self.max_length}

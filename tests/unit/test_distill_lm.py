"""runner.compress.DistillLM on a tiny random Llama (saved as a folder and loaded as a CausalLM, as
tests/unit/test_smollm2.py does): the loss is the hand-computed one, init=copy copies the chosen teacher
layers, embeddings and head exactly, a few steps of distillation lower the KL to the teacher, bad keys
fail naming them, and the student is a smaller CausalLM that lm_metrics evaluates."""

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import SPEC, compose_config
from torch.utils.data import DataLoader, TensorDataset

from runner.compress import CompressContext, DistillLM, Recipe, build_recipe
from runner.compress.base import QuantizedPreview
from runner.compress.distill_lm import copied_layers, lm_distillation_loss, predicting
from runner.errors import ConfigError
from runner.models import MLP, CausalLM, lm_metrics

PAD = 0
TRAINER = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
LAYERS = 4


def llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    return LlamaConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random Llama causal LM saved as a Hugging Face folder, loaded as a CausalLM. Its LM head is
    scaled up so its next-token distributions are far from uniform (a random Llama's are nearly so)."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_config())
    with torch.no_grad():
        lm.lm_head.weight.mul_(20.0)
    lm.save_pretrained(folder)
    return CausalLM(str(folder), max_length=12).eval()


def text_batch(n: int = 8, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `n` random texts of 2..length tokens, right-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids * mask + PAD * (1 - mask), mask


class Texts(pl.LightningDataModule):
    """Text batches as a text data source gives them: ({input_ids, attention_mask}, labels)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 4) -> None:
        super().__init__()
        self.data = TensorDataset(ids, mask, torch.zeros(len(ids), dtype=torch.long))
        self.batch_size = batch_size

    @staticmethod
    def collate(rows):
        ids, mask, y = (torch.stack(t) for t in zip(*rows))
        return {"input_ids": ids, "attention_mask": mask}, y

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)


def step(**kwargs) -> DistillLM:
    return Recipe([DistillLM(**kwargs)]).steps[0]  # its key: compress.steps[0]


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_params(config, layers: int, hidden: int, intermediate: int) -> int:
    """A Llama's parameter count from its config: embeddings, `layers` decoder layers (attention
    q/k/v/o, gated MLP, two RMSNorms), the final norm and the LM head (unless tied)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    layer = attention + 3 * hidden * intermediate + 2 * hidden
    embeddings = config.vocab_size * hidden
    return embeddings + layers * layer + hidden + (0 if config.tie_word_embeddings else embeddings)


@torch.no_grad()
def mean_kl(student: CausalLM, teacher: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(teacher || student) at T=1, averaged over the positions where a real token predicts a real one."""
    real = predicting(mask)
    t = teacher.eval()(ids, mask)[:, :-1][real].double().log_softmax(-1)
    s = student.eval()(ids, mask)[:, :-1][real].double().log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


# --- the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_the_loss_is_the_hand_computed_one(alpha):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g) * 3
    ids = torch.randint(1, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    temperature = 2.0

    def log_softmax(v):  # written out
        return v - torch.log(torch.exp(v - v.max()).sum()) - v.max()

    kls, ces = [], []
    for b in range(3):
        for t in range(4):
            if mask[b, t] and mask[b, t + 1]:  # a real token predicting a real token
                p_t = log_softmax(teacher[b, t].double() / temperature)
                p_s = log_softmax(student[b, t].double() / temperature)
                kls.append(float((torch.exp(p_t) * (p_t - p_s)).sum()))
                ces.append(-float(log_softmax(student[b, t].double())[ids[b, t + 1]]))
    assert len(kls) == 4 + 2  # the third text has one token: it predicts nothing
    expected = alpha * temperature**2 * sum(kls) / len(kls) + (1 - alpha) * sum(ces) / len(ces)
    got = lm_distillation_loss(student, teacher, ids, mask, temperature, alpha)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    if alpha == 0:  # the teacher is not needed (nor run) for the cross-entropy alone
        assert float(lm_distillation_loss(student, None, ids, mask, temperature, 0.0)) == pytest.approx(expected)


def test_copied_layers_are_evenly_spaced_from_the_first_to_the_last():
    assert copied_layers(30, 4) == [0, 10, 19, 29]  # SmolLM2-135M into 4 layers
    assert copied_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert copied_layers(4, 2) == [0, 3]
    assert copied_layers(4, 4) == [0, 1, 2, 3]
    assert copied_layers(4, 1) == [0]


# --- the student --------------------------------------------------------------------------------


def test_init_copy_copies_the_chosen_layers_the_embeddings_norm_and_head_exactly(teacher):
    student = step(layers=2, init="copy").build_student(teacher)
    s, t = student.lm.state_dict(), teacher.lm.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name]), name
    chosen = copied_layers(LAYERS, 2)
    assert chosen == [0, 3]
    layer_keys = [k for k in t if k.startswith("model.layers.0.")]
    assert len(layer_keys) == 9
    for i, source in enumerate(chosen):
        for key in layer_keys:
            suffix = key.removeprefix("model.layers.0.")
            assert torch.equal(s[f"model.layers.{i}.{suffix}"], t[f"model.layers.{source}.{suffix}"]), (i, suffix)
    assert not any(k.startswith("model.layers.2.") for k in s)
    assert student.lm.config.num_hidden_layers == 2 and teacher.lm.config.num_hidden_layers == LAYERS
    # at the teacher's depth the copy is the teacher
    ids, mask = text_batch()
    with torch.no_grad():
        assert torch.equal(step(layers=LAYERS).build_student(teacher)(ids, mask), teacher(ids, mask))
    # a copy, not a view: training the student leaves the teacher as it was
    assert student.lm.lm_head.weight.data_ptr() != teacher.lm.lm_head.weight.data_ptr()


def test_init_copy_keeps_tied_embeddings_tied():
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    tied = CausalLM.wrap(LlamaForCausalLM(llama_config(tie_word_embeddings=True)), "tiny")
    student = step(layers=3).build_student(tied)
    assert student.lm.lm_head.weight is student.lm.model.embed_tokens.weight
    assert torch.equal(student.lm.lm_head.weight, tied.lm.model.embed_tokens.weight)
    assert params(student) == expected_params(tied.lm.config, 3, 32, 64)


def test_init_random_draws_from_the_seed(teacher):
    a, b = step(init="random", seed=3).build_student(teacher), step(init="random", seed=3).build_student(teacher)
    c = step(init="random", seed=4).build_student(teacher)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a.lm.state_dict()[name], b.lm.state_dict()[name])
    assert not torch.equal(a.lm.state_dict()[name], c.lm.state_dict()[name])
    assert not torch.equal(a.lm.state_dict()[name], teacher.lm.state_dict()[name])


def test_the_student_works_with_lm_metrics_and_is_smaller_by_the_expected_count(teacher):
    config = teacher.lm.config
    assert params(teacher) == expected_params(config, LAYERS, 32, 64)
    per_layer = expected_params(config, 1, 32, 64) - expected_params(config, 0, 32, 64)
    ids, mask = text_batch()
    batches = [
        {"input_ids": ids[:4], "attention_mask": mask[:4]},
        ({"input_ids": ids[4:], "attention_mask": mask[4:]}, None),
    ]
    for kwargs, layers, hidden, intermediate in (
        ({"layers": 2}, 2, 32, 64),
        ({"layers": 1, "init": "random", "hidden_size": 16, "intermediate_size": 32}, 1, 16, 32),
    ):
        student = step(**kwargs).build_student(teacher)
        assert isinstance(student, CausalLM) and student.preprocessing == teacher.preprocessing
        assert params(student) == expected_params(config, layers, hidden, intermediate)
        if hidden == 32:
            assert params(teacher) - params(student) == (LAYERS - layers) * per_layer
        assert params(student) < params(teacher)
        metrics = lm_metrics(student, batches)
        assert metrics["tokens"] == int(predicting(mask).sum()) and math.isfinite(metrics["perplexity"])
        assert student(ids, mask).shape == (8, 12, 64)  # the teacher's vocabulary (its tokenizer)


# --- training -----------------------------------------------------------------------------------


def test_a_few_steps_of_distillation_lower_the_kl_to_the_teacher(teacher):
    ids, mask = text_batch(8, 12, seed=0)
    distill = step(layers=2, init="copy", temperature=1.0, alpha=1.0, epochs=8, lr=3e-3)
    teacher_state, teacher_mode = copy.deepcopy(teacher.state_dict()), teacher.training
    before = mean_kl(distill.build_student(teacher), teacher, ids, mask)
    pl.seed_everything(0, verbose=False)
    student = distill.apply(teacher, CompressContext(Texts(ids, mask), TRAINER, {"name": "adam", "lr": 1.0}))
    after = mean_kl(student, teacher, ids, mask)
    assert before > 0.05  # the copied 2 of 4 layers leave a real gap
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # untouched
    assert teacher.training == teacher_mode and not student.training
    stats = distill.stats_
    assert stats["distill_lm/layers"] == 2 and stats["distill_lm/teacher_layers"] == LAYERS
    assert stats["distill_lm/student_params"] == params(student) < stats["distill_lm/teacher_params"] == params(teacher)
    assert math.isfinite(stats["distill_lm/train_loss"])


def test_batches_per_epoch_limits_the_steps(teacher):
    ids, mask = text_batch(8, 12, seed=5)
    calls = []
    distill = step(layers=1, epochs=2, batches_per_epoch=1)
    original = distill.build_student

    def build(t):
        student = original(t)
        student.register_forward_hook(lambda *a: calls.append(1) if student.training else None)
        return student

    distill.build_student = build
    distill.apply(teacher, CompressContext(Texts(ids, mask), TRAINER, {}))
    assert len(calls) == 2  # 2 epochs of 1 batch (of the 2 the data holds)


# --- bad keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"temperature": 0.0}, "temperature=0.0; allowed: a float > 0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"alpha": 1.5}, r"alpha=1.5; allowed: a float in \[0, 1\]"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"layers": 0}, "layers=0"),
        ({"init": "distil"}, r"init='distil'; allowed: \['copy', 'random'\]"),
        ({"epochs": -1}, "epochs=-1"),
        ({"lr": 0}, "lr=0"),
        ({"batches_per_epoch": 0}, "batches_per_epoch=0"),
    ],
)
def test_bad_values_fail_naming_the_key(kwargs, key):
    node = {"steps": [{"_target_": "runner.compress.DistillLM", **kwargs}]}
    with pytest.raises(ConfigError, match=rf"compress\.steps\[0\]\.{key}"):
        build_recipe(node)


def test_what_does_not_fit_the_teacher_fails_naming_the_key_before_training(teacher):
    with pytest.raises(ConfigError, match=r"compress\.steps\[0\]\.layers=5; allowed: an integer in \[1, 4\]"):
        step(layers=5).check(teacher, SPEC)
    with pytest.raises(ConfigError, match=r"compress\.steps\[0\]\.hidden_size=16; allowed: null or 32 with init: copy"):
        step(hidden_size=16).check(teacher, SPEC)
    with pytest.raises(ConfigError, match=r"compress\.steps\[0\]\.intermediate_size=32; allowed: null or 64"):
        step(intermediate_size=32, init="copy").check(teacher, SPEC)
    with pytest.raises(ConfigError, match=r"compress\.steps\[0\]\.hidden_size=18; allowed: a multiple of the"):
        step(hidden_size=18, init="random").check(teacher, SPEC)
    step(layers=4, hidden_size=32).check(teacher, SPEC)  # the teacher's own width is fine with copy
    step(hidden_size=16, intermediate_size=32, init="random").check(teacher, SPEC)


def test_a_model_that_is_not_a_float_causal_lm_is_refused_naming_the_step(teacher):
    recipe = build_recipe(compose_config(["compress=distill_lm"]).compress)
    assert isinstance(recipe.steps[0], DistillLM) and not recipe.keeps_weights
    with pytest.raises(ConfigError, match=r"compress\.steps\[0\]='MLP'; allowed: a causal language model"):
        recipe.check(MLP(40, 10), SPEC)
    with pytest.raises(ConfigError, match=r"compress\.steps\[0\]='QuantizedPreview'; allowed: a float model"):
        recipe.check(QuantizedPreview(teacher), SPEC)
    recipe.check(teacher, SPEC)  # the YAML's defaults fit a 4-layer teacher

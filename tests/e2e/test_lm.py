"""A causal LM job (runner/lm.py) end to end on a tiny random Llama with a tokenizer of its own: the
perplexity and next-token accuracy logged are lm_metrics' on the test texts the data option holds,
the compressed model's are those of the same step applied outside the job, the deltas and ratios are
the differences of what was logged; keys the job cannot use are refused before anything runs."""

import math

import pytest
import torch
from conftest import compose_config
from mlflow import MlflowClient

from runner.compress import CompressContext, build_recipe
from runner.config import build
from runner.data import as_source
from runner.data.sources import data_spec
from runner.errors import ConfigError
from runner.lm import plan_lm, text_inputs
from runner.models import CausalLM, lm_metrics
from runner.pipeline import run

pytestmark = pytest.mark.slow


def lm_config(tmp_path, folder, *extra):
    return compose_config(
        [
            "experiment=smollm2_lm",
            f"model.weights={folder}",
            "data.max_rows=200",
            "model.max_length=24",
            "eval.latency_repeats=2",
            *extra,
        ],
        tmp_path,
    )


def runs(tmp_path) -> dict:
    """The job's runs by their role tag: job, member (the LM as loaded), compressed."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("smollm2_lm").experiment_id])
    assert all(r.info.status == "FINISHED" for r in found)
    return {r.data.tags["role"]: r for r in found}


def job_metrics(tmp_path) -> dict:
    return runs(tmp_path)["job"].data.metrics


def test_the_logged_figures_are_lm_metrics_of_the_test_texts_before_and_after_wanda(tmp_path, tiny_lm):
    cfg = lm_config(tmp_path, tiny_lm, "compress=prune_wanda", "compress.steps.0.calibration_batches=2")
    run(cfg, choices={"choice/model": "smollm2_lm"})  # the command line passes the options picked
    logged = job_metrics(tmp_path)

    # outside the job: the same data option's test texts, the model loaded from the folder, the same step
    dm = as_source(build(cfg.data, "data"))
    data_spec(dm)  # as the job: it sets the data up and reads one training batch
    test = list(text_inputs(dm.test_dataloader()))
    model = CausalLM(tiny_lm, max_length=24)
    base = lm_metrics(model, test)
    for key in ("perplexity", "nll", "next_token_acc", "tokens"):
        assert logged[f"lm/member/{key}"] == pytest.approx(base[key], rel=1e-9, abs=1e-12), key
    assert math.isclose(logged["lm/member/perplexity"], math.exp(logged["lm/member/nll"]), rel_tol=1e-9)
    # every real token after a text's first is predicted: the tokens counted are the mask's
    assert logged["lm/member/tokens"] == sum(int(b["attention_mask"].sum()) - len(b["attention_mask"]) for b in test)

    torch.manual_seed(cfg.seed)  # as the job, before its recipe runs
    pruned = build_recipe(cfg.compress).apply(model, CompressContext(dm, cfg.trainer, cfg.optim, teacher=model))
    after = lm_metrics(pruned, test)
    for key in ("perplexity", "next_token_acc"):
        assert logged[f"lm/compressed/{key}"] == pytest.approx(after[key], rel=1e-6), key
        assert logged[f"lm/compressed/delta/{key}"] == pytest.approx(after[key] - base[key], rel=1e-6, abs=1e-9)
    assert logged["lm/compressed/perplexity_ratio"] == pytest.approx(after["perplexity"] / base["perplexity"])
    assert logged["lm/compressed/perplexity"] != logged["lm/member/perplexity"]
    # Wanda halves every row of every Linear but the LM head (widths 32 and 64: exactly half)
    assert logged["lm/compressed/wanda/sparsity"] == 0.5
    linears = [m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    assert len(linears) == 2 * 7 and all(float((m.weight == 0).float().mean()) == 0.5 for m in linears)
    # zeros are still stored: the same weight bytes (unstructured sparsity needs a sparse format)
    assert logged["lm/compressed/weight_bytes"] == logged["lm/member/weight_bytes"]
    assert logged["lm/member/weight_bytes"] == 4 * sum(t.numel() for t in model.state_dict().values())
    # one child run per model, as the pipeline's: the same figures, the test split's under test/
    children = runs(tmp_path)
    assert sorted(children) == ["compressed", "job", "member"]
    for role in ("member", "compressed"):
        child = children[role].data
        assert child.tags["member"] == "smollm2_lm" and child.tags["mlflow.parentRunId"] == children["job"].info.run_id
        assert child.metrics["test/perplexity"] == logged[f"lm/{role}/perplexity"]
        assert child.metrics["weight_bytes"] == logged[f"lm/{role}/weight_bytes"]
    assert children["compressed"].data.metrics["delta/perplexity"] == logged["lm/compressed/delta/perplexity"]
    assert logged["lm/member/tokens_per_s"] == pytest.approx(logged["lm/member/tokens"] / logged["lm/member/eval_s"])


def test_weight_only_int8_quarters_the_linear_weights_and_logs_the_ratio(tmp_path, tiny_lm):
    cfg = lm_config(tmp_path, tiny_lm, "compress=quant_int8_weight")
    run(cfg)
    logged = job_metrics(tmp_path)
    assert logged["lm/compressed/weight_ratio"] == pytest.approx(
        logged["lm/member/weight_bytes"] / logged["lm/compressed/weight_bytes"]
    )
    assert logged["lm/compressed/weight_bytes"] < logged["lm/member/weight_bytes"]
    # int8 weights with per-row scales: within a few percent of the float model's perplexity here
    assert logged["lm/compressed/perplexity"] != logged["lm/member/perplexity"]
    assert abs(logged["lm/compressed/perplexity_ratio"] - 1) < 0.05


@pytest.mark.parametrize(
    "extra, key",
    [
        (["fuse=mean"], "fuse"),
        (["merge=average"], "merge"),
    ],
)
def test_what_a_causal_lm_job_cannot_do_is_refused_naming_the_key(tmp_path, tiny_lm, extra, key):
    with pytest.raises(ConfigError) as err:
        plan_lm(lm_config(tmp_path, tiny_lm, *extra))
    assert err.value.key == key


def test_data_without_token_ids_is_refused(tmp_path, tiny_lm):
    with pytest.raises(ConfigError) as err:
        plan_lm(compose_config(["model=smollm2_lm", f"model.weights={tiny_lm}", "data=digits"], tmp_path))
    assert err.value.key == "data" and "text data option" in str(err.value)

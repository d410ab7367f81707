"""Int8 engines side by side on the CPU: latency, agreement with fp32, size, one-off cost.

    .venv/bin/python benchmarks/quantization.py                  # all seven models (~3-4 min, 2 cores)
    .venv/bin/python benchmarks/quantization.py --quick          # smoke run: 3 models, few repeats (~1 min)
    .venv/bin/python benchmarks/quantization.py --models cnn1d,lenet5,resnet20 --batch 256 --no-compile

Models (built from conf/model/*.yaml on MNIST-shaped data): lenet300, mlp, cnn1d (784 pixels as a
sequence), lenet5, resnet20 and vit_tiny on mnist5k's 1x28x28 digits, trained briefly here so that
their predictions are confident, as a deployed model's are; bert_tiny on random token ids (vocab
8000, 16 tokens) trained on a synthetic label (more than half of the ids in the vocabulary's
lower half).

Engines: fp32 eager and fp32 + torch.compile (the fair baseline of compiled rows); dynamic int8:
torch.ao quantize_dynamic, torchao Int8DynamicActivationInt8WeightConfig eager and compiled;
static int8: torch.ao FX (torch.fx-traceable models), PT2E X86InductorQuantizer lowered to oneDNN
kernels in eager mode (`pt2e`), and PT2E + torch.compile (LeNet-5 and ResNet-20 only). The int8
models come from the functions runner.compress.quantize's steps call (torchao dynamic, which no
step uses, from `torchao_dynamic` here); each model's line says which engine `auto` picks.

Latency: torch.set_num_threads(--threads) (printed), `--warmup` calls, then median and
interquartile range of `--repeats` calls, at batch 1 and --batch. torch.compile uses
dynamic=False (one graph per batch size) and Inductor's freezing (weights become constants,
prepacked for oneDNN: PT2E's int8 kernels need it); Inductor's caches are off, so `setup_s`
(quantize + calibrate + lower + compile + first calls at both batch sizes) is the true one-off
cost. agree: fraction of test inputs whose argmax equals fp32's. size_kb: torch.save(state_dict).
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from runner.batches import Inputs, num_samples, take  # noqa: E402
from runner.compress import quantize as Q  # noqa: E402
from runner.data import MNIST5k  # noqa: E402
from runner.models.adapter import build_model as build_net  # noqa: E402

MODELS = ("lenet300", "mlp", "cnn1d", "lenet5", "resnet20", "vit_tiny", "bert_tiny")
CNNS = ("lenet5", "resnet20")
VOCAB, TOKENS = 8000, 16


def build_model(name: str) -> nn.Module:
    """The model as its YAML builds it, with MNIST's (or the token task's) data fields filled in."""
    data = (
        {"num_classes": 2, "vocab_size": VOCAB, "max_length": TOKENS}
        if name == "bert_tiny"
        else {"num_classes": 10, "num_features": 784, "input_shape": [1, 28, 28]}
    )
    cfg = OmegaConf.create({"data": data, "model": OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")})
    return build_net(cfg.model, "model")


def token_task(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, TOKENS), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ((ids < VOCAB // 2).sum(1) > TOKENS // 2).long()


def data(name: str, n_train: int) -> tuple[Inputs, torch.Tensor, Inputs]:
    """(train x, train y, test x) for `name`."""
    if name == "bert_tiny":
        x, y = token_task(n_train, 0)
        return x, y, token_task(1024, 1)[0]
    dm = MNIST5k(split_seed=0)
    dm.setup()
    (x, y), (x_test, _) = dm.splits["train"], dm.splits["test"]
    return x[:n_train], y[:n_train], x_test


def train(model: nn.Module, x: Inputs, y: torch.Tensor, epochs: int, batch: int = 64) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch):
            loss = nn.functional.cross_entropy(model(take(x, idx)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def timings(model: Callable, x: Inputs, warmup: int, repeats: int) -> tuple[float, float]:
    """Median and interquartile range of one call, in milliseconds."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(1000 * (time.perf_counter() - start))
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


@torch.no_grad()
def predictions(model: Callable, x: Inputs, batch: int) -> torch.Tensor:
    """Argmax over whole batches of size `batch` only (a compiled graph is specialised to it)."""
    n = num_samples(x) // batch * batch
    return torch.cat([model(take(x, slice(i, i + batch))).argmax(1) for i in range(0, n, batch)])


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def compiled(model: nn.Module) -> Callable:
    # Every Net shares one forward code object: without a reset, dynamo's recompile limit is
    # reached after a few models and later "compiled" rows silently run eager.
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False)


def torchao_dynamic(model: nn.Module) -> nn.Module:
    """torchao's int8 dynamic-activation, int8-weight Linear layers (tensor-subclass weights)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    out = copy.deepcopy(model)
    quantize_(out, Int8DynamicActivationInt8WeightConfig())
    return out


def auto_choice(model: nn.Module, example: Inputs) -> str:
    """What the steps' engine=auto does with `model`."""
    from runner.compress import DynamicQuantize, StaticQuantize
    from runner.data import DataSpec
    from runner.errors import ConfigError

    spec = DataSpec(10, example, {})
    try:
        DynamicQuantize().check(model, spec)
        dynamic = "torch_ao"
    except ConfigError:
        dynamic = "refused"
    step = StaticQuantize()
    try:
        step.check(model, spec)
        static = step.engine_for(model)
    except ConfigError:
        static = "refused"
    return f"auto: DynamicQuantize {dynamic}, StaticQuantize {static}"


def engines(name: str, model: nn.Module, x_cal: Inputs, args) -> dict[str, Callable[[], tuple[Callable, nn.Module]]]:
    """label -> builder returning (callable to time, module whose state_dict is the size)."""
    example = take(x_cal, slice(0, 2))

    def calibrate(prepared: nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, min(num_samples(x_cal), 640), 64):  # 10 batches of 64, as quant_static
                prepared(take(x_cal, slice(i, i + 64)))

    def same(m: nn.Module) -> tuple[Callable, nn.Module]:
        return m, m

    def compile_(m: nn.Module) -> tuple[Callable, nn.Module]:
        return compiled(m), m

    rows: dict[str, Callable[[], tuple[Callable, nn.Module]]] = {
        "fp32 eager": lambda: same(model),
        "torch.ao dynamic": lambda: same(Q.dynamic_torch_ao(copy.deepcopy(model))),
        "torchao dynamic": lambda: same(torchao_dynamic(model)),
        "torch.ao FX static": lambda: same(Q.static_torch_ao(model, example, calibrate)),
        "pt2e static (oneDNN eager)": lambda: same(Q.static_pt2e(model, example, calibrate)),
    }
    if args.compile:
        rows["fp32 + compile"] = lambda: compile_(copy.deepcopy(model))
        rows["torchao dynamic + compile"] = lambda: compile_(torchao_dynamic(model))
        if name in CNNS:
            rows["pt2e static + compile"] = lambda: compile_(Q.pt2e_reference(model, example, calibrate))
    return rows


def bench_model(name: str, args) -> None:
    t0 = time.time()
    x, y, x_test = data(name, args.train)
    model = train(build_model(name), x, y, args.epochs)
    batches = (1, args.batch)
    inputs = {b: take(x_test, slice(0, b)) for b in batches}
    reference = predictions(model, x_test, args.batch)
    print(
        f"\n{name}: {sum(p.numel() for p in model.parameters()):,} params, trained {args.epochs} epochs on "
        f"{len(y)} samples in {time.time() - t0:.0f}s; agreement on {len(reference)} test inputs; "
        f"{auto_choice(model, take(x, slice(0, 2)))}",
        flush=True,
    )
    print(
        f"  {'engine':28} {'b1 ms':>8} {'iqr':>6} {f'b{args.batch} ms':>9} {'iqr':>6} {'x fp32':>7} "
        f"{'agree':>6} {'size_kb':>8} {'setup_s':>7}"
    )
    base = None
    for label, make in engines(name, model, x, args).items():
        start = time.time()
        try:
            run, module = make()
            with torch.no_grad():
                for b in batches:  # the first calls compile / lower: part of the one-off cost
                    run(inputs[b])
        except Exception as e:  # an engine that cannot handle this model is a result too
            print(f"  {label:28} n/a: {type(e).__name__}: {str(e).splitlines()[0][:90]}", flush=True)
            continue
        setup = time.time() - start
        t = {b: timings(run, inputs[b], args.warmup, args.repeats) for b in batches}
        base = base or t[args.batch][0]
        agree = float((predictions(run, x_test, args.batch) == reference).double().mean())
        print(
            f"  {label:28} {t[1][0]:8.3f} {t[1][1]:6.3f} {t[args.batch][0]:9.3f} {t[args.batch][1]:6.3f} "
            f"{base / t[args.batch][0]:7.2f} {agree:6.3f} {state_bytes(module) / 1024:8.1f} {setup:7.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="the large batch (the other is 1)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=3600, help="training samples per model")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--quick", action="store_true", help="lenet300, lenet5, bert_tiny; 1 epoch; 5 repeats")
    args = parser.parse_args()
    if args.quick:
        args.models = args.models if "--models" in sys.argv else "lenet300,lenet5,bert_tiny"
        args.repeats, args.warmup, args.epochs, args.train = 5, 2, 1, 1000
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # compile time = the real one-off cost
    torch._inductor.config.freezing = True  # weights as constants: prepacked (oneDNN) for fp32 and int8 alike
    for logger in ("torch._inductor", "torch._dynamo", "torch.utils._pytree"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    torchao = Q.import_torchao()
    print(
        f"torch {torch.__version__}, torchao {torchao.__version__}, threads {torch.get_num_threads()}, "
        f"quantized engine {torch.backends.quantized.engine}, batches 1 and {args.batch}, "
        f"median and IQR of {args.repeats} calls after {args.warmup}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} (other processes share the cores: compare rows of one run)"
    )
    start = time.time()
    for name in names:
        bench_model(name, args)
    print(f"\ntotal {time.time() - start:.0f}s, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Every recipe in conf/compress on MNIST-1D's MLP and CNN, measured side by side in one run.

    .venv/bin/python benchmarks/compression.py            # the table + the distillation study (~5-10 min, 2 cores)
    .venv/bin/python benchmarks/compression.py --quick    # a smoke run
    python benchmarks/compression.py --library-only       # fp32 vs torch.ao vs torchao int8 latency (needs torchao)
    .venv/bin/python benchmarks/compression.py --structured  # untrained ResNet-20, LeNet-5, ViT at half the MACs

Members: MLP 40-256-256-10 (hidden 256: the width whose published accuracy is 68%, and wide enough
for sparsity and int8 to matter) and the paper's CNN, Adam lr 1e-2, batch 100. Latency: median of
`--repeats` forward passes of one 256-sample batch with torch.set_num_threads fixed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch import nn  # noqa: E402

import runner.config  # noqa: E402,F401
from runner.compress import (  # noqa: E402
    CompressContext,
    GradualPrune,
    MagnitudePrune,
    Recipe,
    StaticQuantize,
    build_recipe,
    compression_report,
    weight_bytes,
)
from runner.compress.base import finetune  # noqa: E402
from runner.compress.prune import weight_sparsity  # noqa: E402,F401
from runner.data import MNIST1D, DataSpec  # noqa: E402
from runner.errors import ConfigError  # noqa: E402
from runner.evaluate import count_macs, evaluate_model, latency_ms  # noqa: E402
from runner.models import CNN1D, MLP, HuggingFace, LeNet5, LitClassifier, ResNetCIFAR  # noqa: E402
from runner.train import train_classifier  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
OPTIM = {"name": "adam", "lr": 1e-2}
# steps_per_call 0: a whole epoch per Lightning step, as the pipeline's trainer default does
TRAINER = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "steps_per_call": 0}


class MixupAlone(LitClassifier):
    """The distillation control: the student alone with the same mixup inputs, on mixed hard labels."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lam = torch.distributions.Beta(1.0, 1.0).sample((len(x),))
        perm = torch.randperm(len(x))
        logp = self.net(lam[:, None] * x + (1 - lam[:, None]) * x[perm]).log_softmax(1)
        mixed = -(lam * logp[torch.arange(len(y)), y] + (1 - lam) * logp[torch.arange(len(y)), y[perm]]).mean()
        return (nn.functional.cross_entropy(logits, y) + mixed) / 2


class MeanEnsemble(nn.Module):
    """Probability averaging of members; forward returns log-probabilities (like a fused model)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(1) for m in self.members]).mean(0).clamp_min(1e-12).log()


def recipes() -> dict[str, Recipe]:
    names = sorted(p.stem for p in (ROOT / "conf" / "compress").glob("*.yaml"))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return {n: build_recipe(compose("config", overrides=[f"compress={n}"]).compress) for n in names}


def train(net: nn.Module, dm, seed: int, epochs: int) -> nn.Module:
    pl.seed_everything(seed, verbose=False)
    return train_classifier(net, dm, {**TRAINER, "max_epochs": epochs, "limit_val_batches": 0}, OPTIM)


def evaluate(model: nn.Module, dm, x_lat: torch.Tensor, repeats: int) -> dict[str, float]:
    metrics, _, _, _ = evaluate_model(
        model, dm.test_dataloader(), dm.num_classes, ["acc", "f1"], latency_batch=x_lat, latency_repeats=repeats
    )
    return {**metrics, "weight_bytes": weight_bytes(model)}


def compression_table(dm, args) -> None:
    x_lat = dm.splits["test"][0][:256]
    trainer = TRAINER
    all_recipes = recipes()
    print("\nsize_x: serialized state_dict ratio; w_x: tensor-data ratio (runner.compress.weight_bytes)")
    print(
        f"{'model':6} {'recipe':24} {'acc':>6} {'d_acc':>6} {'d_f1':>6} {'size_x':>6} {'w_x':>5} {'speedup':>7} "
        f"{'lat_ms':>7} {'nonzero':>7} {'params':>7} {'time_s':>6}"
    )
    for kind, make in (("mlp", lambda: MLP(40, 10, hidden=args.hidden)), ("cnn", lambda: CNN1D(40, 10))):
        t0 = time.time()
        members = [train(make(), dm, seed, args.epochs) for seed in range(args.ensemble)]
        member = members[0]
        ctx = CompressContext(dm, trainer, OPTIM, teacher=member, ensemble=MeanEnsemble(members))
        base = evaluate(member, dm, x_lat, args.repeats)
        print(
            f"{kind:6} {'(uncompressed)':24} {base['acc']:6.3f} {'':6} {'':6} {1:6.2f} {1:5.2f} {1:7.2f} "
            f"{base['latency_ms']:7.3f} {1:7.3f} {base['params']:7.0f} {time.time() - t0:6.1f}"
        )
        todo = dict(all_recipes)
        if kind == "cnn":  # deep compression for conv nets: the same chain ending in static int8
            todo["deep_compression_static"] = Recipe(all_recipes["deep_compression"].steps[:2] + [StaticQuantize()])
        for name, recipe in todo.items():
            try:
                recipe.check(member, DataSpec(10, x_lat[:8], dm.input_spec))
            except ConfigError as e:
                print(f"{kind:6} {name:24} n/a: {e.allowed[:60]}")
                continue
            pl.seed_everything(0, verbose=False)
            t0 = time.time()
            out = recipe.apply(member, ctx)
            spent = time.time() - t0
            got = evaluate(out, dm, x_lat, args.repeats)
            rep = compression_report(base, got)
            print(
                f"{kind:6} {name:24} {got['acc']:6.3f} {100 * rep['delta/acc']:+6.1f} {100 * rep['delta/f1']:+6.1f} "
                f"{rep['compression_ratio']:6.2f} {rep['weight_ratio']:5.2f} {rep['speedup']:7.2f} {got['latency_ms']:7.3f} "
                f"{rep['nonzero_fraction']:7.3f} {got['params']:7.0f} {spent:6.1f}",
                flush=True,
            )


def distillation_study(dm, args) -> None:
    """The student of conf/compress/distill.yaml alone, alone with mixup (control), distilled with
    Hinton's loss only (mixup 0) and with the YAML's mixup; same seeds, epochs and lr."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        step = build_recipe(compose("config", overrides=["compress=distill"]).compress).steps[0]
    step.epochs, hidden, mixup = args.student_epochs, step.student.hidden, step.mixup
    seeds = [100 + s for s in range(args.seeds)]
    print(
        f"\ndistillation: student MLP hidden {hidden} x2 ({sum(p.numel() for p in step.build_student().parameters())} "
        f"params), {step.epochs} epochs, lr {OPTIM['lr']}, T={step.temperature}, alpha={step.alpha}; "
        f"test acc over seeds {seeds}"
    )

    def row(label: str, accs: list[float]) -> None:
        print(
            f"  {label:40} {statistics.mean(accs):.3f} +- {statistics.stdev(accs):.3f}  {[round(a, 3) for a in accs]}",
            flush=True,
        )

    ctx = CompressContext(dm, TRAINER, OPTIM)
    for label, module in (("student alone", LitClassifier), ("student alone + mixup (control)", MixupAlone)):
        accs = []
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            accs.append(
                evaluate(
                    finetune(step.build_student(), ctx, step.epochs, None, module), dm, dm.splits["test"][0][:8], 1
                )["acc"]
            )
        row(label, accs)
    for kind, make in (("mlp", lambda: MLP(40, 10, hidden=args.hidden)), ("cnn", lambda: CNN1D(40, 10))):
        teacher = train(make(), dm, 0, args.epochs)
        t_acc = evaluate(teacher, dm, dm.splits["test"][0][:8], 1)["acc"]
        ctx = CompressContext(dm, TRAINER, OPTIM, teacher=teacher)
        for step.mixup in (0.0, mixup):
            accs = []
            for seed in seeds:
                pl.seed_everything(seed, verbose=False)
                accs.append(evaluate(Recipe([step]).apply(teacher, ctx), dm, dm.splits["test"][0][:8], 1)["acc"])
            row(f"distilled from {kind} ({t_acc:.3f}), mixup {step.mixup}", accs)


def sparsity_study(dm, args) -> None:
    """The CNN's accuracy against global sparsity: how far unstructured pruning goes within 1 point."""
    teacher = train(CNN1D(40, 10), dm, 0, args.epochs)
    base = evaluate(teacher, dm, dm.splits["test"][0][:8], 1)["acc"]
    ctx = CompressContext(dm, TRAINER, OPTIM)
    print(
        f"\nCNN sparsity (uncompressed {base:.3f}; min_params 200 keeps the 125-weight first conv dense; "
        f"target sparsity among the pruned layers, overall = all weights), seeds 0, 1"
    )
    steps = {
        f"one-shot {s:.1f}, 20 ep{', first conv dense' if m else ''}": MagnitudePrune(
            s, finetune_epochs=20, min_params=m
        )
        for s in (0.5, 0.6, 0.7, 0.8, 0.9)
        for m in (0, 200)
    }
    steps["one-shot 0.9, 60 ep, first conv dense"] = MagnitudePrune(0.9, finetune_epochs=60, min_params=200)
    steps["gradual 0.9, 10x4+20 ep, first conv dense"] = GradualPrune(
        0.9, rounds=10, epochs_per_round=4, final_epochs=20, min_params=200
    )
    for label, step in steps.items():
        accs = []
        for seed in range(2):
            pl.seed_everything(seed, verbose=False)
            out = Recipe([step]).apply(teacher, ctx)
            accs.append(evaluate(out, dm, dm.splits["test"][0][:8], 1)["acc"])
        acc = statistics.mean(accs)
        print(
            f"  {label:42} overall {weight_sparsity(out):.3f}  acc {acc:.3f}  d_acc {100 * (acc - base):+5.1f}",
            flush=True,
        )


def library_comparison(args) -> None:
    """fp32 vs int8 dynamic from torch.ao and from torchao (eager, no torch.compile)."""
    torch.manual_seed(0)
    print(f"\nint8 library latency, batch 256, median of {args.repeats}, threads={torch.get_num_threads()}")
    for hidden in (256, 1024):
        model = MLP(40, 10, hidden=hidden).eval()
        x = torch.randn(256, 40)
        rows = {"fp32": model}
        from torch.ao.quantization import quantize_dynamic

        rows["torch.ao dynamic int8"] = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        try:
            import torchao
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

            for label, config in (
                ("torchao int8 dyn-act", Int8DynamicActivationInt8WeightConfig()),
                ("torchao int8 weight-only", Int8WeightOnlyConfig()),
            ):
                q = copy.deepcopy(model)
                quantize_(q, config)
                rows[f"{label} ({torchao.__version__})"] = q
        except ImportError:
            rows["torchao"] = None
        for label, m in rows.items():
            if m is None:
                print(f"  MLP-{hidden:<5} {label:34} not installed")
                continue
            with torch.no_grad():
                err = (m(x) - model(x)).abs().max().item()
            print(f"  MLP-{hidden:<5} {label:34} {latency_ms(m, x, args.repeats):8.3f} ms  max|diff| {err:.4f}")


def structured_table(args) -> None:
    """conf/compress/prune_structured_macs.yaml without fine-tuning, global or uniform, with channel counts
    rounded to multiples of 8 or not, on untrained reference models: what halving the MACs does to size
    and CPU latency."""
    vit = {
        "model_type": "vit",
        "image_size": 32,
        "num_channels": 3,
        "patch_size": 4,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    }  # conf/model/vit_tiny.yaml
    models = {
        "ResNet-20 3x32x32": (lambda: ResNetCIFAR(20, 10, (3, 32, 32)), (3, 32, 32)),
        "LeNet-5 1x28x28": (lambda: LeNet5((1, 28, 28), 10), (1, 28, 28)),
        "vit_tiny 3x32x32": (lambda: HuggingFace("image", 10, vit), (3, 32, 32)),
    }
    template = recipes()["prune_structured_macs"].steps[0]
    print(
        f"\nstructured pruning to macs_target 2 (no fine-tuning); latency: median of {args.repeats} forward "
        f"passes of a {args.batch}-image batch, threads={torch.get_num_threads()}"
    )
    print(
        f"{'model':18} {'scope':8} {'round':>5} {'params':>9} {'-> pruned':>9} {'x':>5} {'MACs/img':>10} "
        f"{'-> pruned':>10} {'x':>5} {'lat_ms':>7} {'-> pruned':>9} {'speedup':>7} {'prune_s':>7}"
    )
    for label, (make, shape) in models.items():
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(args.batch, *shape)

        def size(net, x=x):
            return sum(p.numel() for p in net.parameters()), count_macs(net, x[:1]), latency_ms(net, x, args.repeats)

        base = size(model)
        for scope, round_to in (("global", None), ("global", 8), ("uniform", None), ("uniform", 8)):
            step = copy.deepcopy(template)
            step.scope, step.round_to, step.finetune_epochs, step.final_epochs = scope, round_to, 0, 0
            t0 = time.time()
            step.check(model, DataSpec(10, x[:8], {"shape": list(shape), "dtype": "float32"}))
            pruned = step.preview(model)
            spent = time.time() - t0
            got = size(pruned)
            print(
                f"{label:18} {scope:8} {round_to or '-':>5} {base[0]:9d} {got[0]:9d} {base[0] / got[0]:5.2f} "
                f"{base[1]:10.0f} {got[1]:10.0f} {base[1] / got[1]:5.2f} {base[2]:7.2f} {got[2]:9.2f} "
                f"{base[2] / got[2]:7.2f} {spent:7.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60, help="member training epochs (36 steps each)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ensemble", type=int, default=3, help="members in the distill_ensemble teacher")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student-epochs", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--library-only", action="store_true")
    parser.add_argument("--structured", action="store_true", help="only the structured-pruning table")
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass (--structured)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.student_epochs, args.repeats, args.ensemble, args.seeds = 3, 2, 5, 2, 2
    if args.library_only:
        return library_comparison(args)
    if args.structured:
        return structured_table(args)
    start = time.time()
    dm = MNIST1D(cache_dir=str(ROOT / "outputs" / "data"))
    dm.setup()
    print(
        f"MNIST-1D train/val/test {[len(dm.splits[s][1]) for s in ('train', 'val', 'test')]}, "
        f"members {args.epochs} epochs, threads {args.threads}, torch {torch.__version__}"
    )
    compression_table(dm, args)
    distillation_study(dm, args)
    sparsity_study(dm, args)
    library_comparison(args)
    structured_table(args)
    print(f"\ntotal {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

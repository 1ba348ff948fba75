"""DiLoCo against data-parallel training (DDP) and a single worker, at equal tokens.

All three train the same small Llama-family model from the same initialisation on
the default corpus (the Python standard library's source), and are evaluated on the
same held-out windows:

- DDP: 4 workers average fp32 gradients every step (one AdamW on the mean gradient);
  bytes per member per step = a ring all-reduce, 2 N (M-1)/M x 4 bytes.
- DiLoCo: 4 workers, H inner AdamW steps each, then the int8 pseudo-gradients are
  averaged (each part quantized on the way to its reducer, the result quantized on the
  way back, as swarm.training.allreduce does) and one outer Nesterov step is applied;
  bytes per member per round = 2 N (M-1)/M x (1 + 4/block) bytes.
- single: one worker with the same per-step batch, seeing the same total tokens.

Workers run one after another in this process: this measures the algorithm, not the
network (benchmarks/allreduce.py measures that).

Last line: ``diloco loss_ratio_vs_ddp=<f> bytes_ratio_vs_ddp=<f>``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as a script, this folder comes first on sys.path and its kernels.py / transport.py
# benchmarks would shadow the packages of the same names: put the repository root there.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from kernels import dequantize_blockwise_int8, quantize_blockwise_int8
from kernels.tiny import write_tiny_checkpoint
from swarm.training.data import WindowSampler, default_corpus_dir, list_text_files, tokenize_corpus
from swarm.training.diloco import (
    DiLoCoConfig,
    OuterOptimizer,
    flatten_parameters,
    load_flat_parameters_,
    make_inner_optimizer,
)
from swarm.training.parts import split_parts
from swarm.training.training_model import init_model, language_model_loss

BLOCK = 64  # int8 quantization block (one float32 scale per 64 values)


@dataclass(frozen=True)
class Setting:
    workers: int
    inner_steps: int  # H
    rounds: int
    batch: int
    seq_len: int
    hidden: int
    layers: int
    corpus_bytes: int

    @property
    def steps(self) -> int:
        return self.inner_steps * self.rounds


def int8_round_trip(values: torch.Tensor) -> torch.Tensor:
    codes, scales = quantize_blockwise_int8(values, BLOCK)
    return dequantize_blockwise_int8(codes, scales, BLOCK)


def average_like_the_all_reduce(pseudo_gradients: list[torch.Tensor]) -> torch.Tensor:
    """Each part quantized on its way to the reducer, averaged in fp32, quantized on the way back."""
    numel = pseudo_gradients[0].numel()
    result = torch.empty(numel)
    for start, end in split_parts(numel, [1.0] * len(pseudo_gradients), BLOCK):
        accumulator = torch.zeros(end - start)
        for vector in pseudo_gradients:
            accumulator += int8_round_trip(vector[start:end]) / len(pseudo_gradients)
        result[start:end] = int8_round_trip(accumulator)
    return result


def evaluate(model, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(language_model_loss(model, batch))


def prepare_corpus(setting):
    """The model config, the corpus tokens, a factory of fresh per-worker samplers, and the held-out batch, for
    ``setting``: a tiny checkpoint's tokenizer over the standard library's sources."""
    with tempfile.TemporaryDirectory() as directory:
        config = write_tiny_checkpoint(directory, num_layers=setting.layers, hidden_size=setting.hidden,
                                       vocab_size=512)  # fmt: skip
        tokens = tokenize_corpus(
            list_text_files(default_corpus_dir()), Path(directory) / "tokenizer.json", setting.corpus_bytes
        )

    def samplers() -> list[WindowSampler]:
        return [
            WindowSampler(tokens, setting.seq_len, seed=worker, holdout_windows=64)
            for worker in range(setting.workers)
        ]

    return config, tokens, samplers, samplers()[0].holdout_batch(64)


def train_ddp(setting, config, samplers, inner_config, holdout, curve):
    model = init_model(config, seed=0)
    optimizer, schedule = make_inner_optimizer(model, inner_config)
    tokens = 0
    for step in range(setting.steps):
        optimizer.zero_grad()
        loss = sum(language_model_loss(model, s.next_batch(setting.batch)) for s in samplers) / len(samplers)
        loss.backward()
        optimizer.step()
        schedule.step()
        tokens += setting.workers * setting.batch * setting.seq_len
        if (step + 1) % setting.inner_steps == 0:
            curve.append((tokens, evaluate(model, holdout)))
    numel = sum(p.numel() for p in model.parameters())
    bytes_per_member = setting.steps * 2 * numel * (setting.workers - 1) / setting.workers * 4
    return evaluate(model, holdout), bytes_per_member


def train_diloco(setting, config, samplers, inner_config, holdout, curve):
    replicas = [init_model(config, seed=0) for _ in range(setting.workers)]
    outer = OuterOptimizer(flatten_parameters(replicas[0]), inner_config)
    optimizers = [make_inner_optimizer(replica, inner_config) for replica in replicas]
    tokens = 0
    for _ in range(setting.rounds):
        pseudo_gradients = []
        for replica, sampler, (optimizer, schedule) in zip(replicas, samplers, optimizers, strict=True):
            for _ in range(setting.inner_steps):
                optimizer.zero_grad()
                language_model_loss(replica, sampler.next_batch(setting.batch)).backward()
                optimizer.step()
                schedule.step()
            pseudo_gradients.append(outer.pseudo_gradient(flatten_parameters(replica)))
        new_global = outer.step(average_like_the_all_reduce(pseudo_gradients))
        for replica in replicas:
            load_flat_parameters_(replica, new_global)
        tokens += setting.workers * setting.inner_steps * setting.batch * setting.seq_len
        curve.append((tokens, evaluate(replicas[0], holdout)))
    numel = outer.parameters.numel()
    bytes_per_member = setting.rounds * 2 * numel * (setting.workers - 1) / setting.workers * (1 + 4 / BLOCK)
    return evaluate(replicas[0], holdout), bytes_per_member


def train_single(setting, config, sampler, inner_config, holdout, curve):
    model = init_model(config, seed=0)
    single_config = DiLoCoConfig(
        inner_lr=inner_config.inner_lr,
        warmup_steps=inner_config.warmup_steps,
        total_inner_steps=setting.steps * setting.workers,
    )
    optimizer, schedule = make_inner_optimizer(model, single_config)
    for step in range(setting.steps * setting.workers):
        optimizer.zero_grad()
        language_model_loss(model, sampler.next_batch(setting.batch)).backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % (setting.inner_steps * setting.workers) == 0:
            curve.append(((step + 1) * setting.batch * setting.seq_len, evaluate(model, holdout)))
    return evaluate(model, holdout), 0.0


def plot(curves: dict, bytes_per_point: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    figure, (by_tokens, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        tokens, losses = zip(*curve, strict=True)
        by_tokens.plot(tokens, losses, label=name)
        if bytes_per_point[name]:
            sent = [bytes_per_point[name] * (i + 1) for i in range(len(curve))]
            by_bytes.plot(sent, losses, label=name)
    by_tokens.set(xlabel="tokens", ylabel="held-out loss", title="loss vs tokens")
    by_bytes.set(xlabel="bytes sent per member", ylabel="held-out loss", title="loss vs bytes", xscale="log")
    by_tokens.legend()
    by_bytes.legend()
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small setting that finishes within 120 s on 2 cores"
    )
    parser.add_argument(
        "--plot", type=Path, default=Path("artifacts/diloco.png"), help="PNG path (full mode)"
    )
    parser.add_argument(
        "--inner-steps", type=int, help="H, inner steps per round (default: 30 quick, 50 full)"
    )
    parser.add_argument("--rounds", type=int, help="outer rounds (default: 8 quick, 30 full)")
    parser.add_argument("--hidden", type=int, help="model width (default: 64 quick, 128 full)")
    parser.add_argument("--layers", type=int, help="transformer blocks (default: 2 quick, 4 full)")
    parser.add_argument(
        "--inner-lr", type=float, default=2e-3, help="peak inner AdamW lr (also DDP's and single's)"
    )
    parser.add_argument("--outer-lr", type=float, default=0.7, help="outer Nesterov lr")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov momentum")
    parser.add_argument("--skip-single", action="store_true", help="do not train the single-worker baseline")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if args.quick:
        setting = Setting(workers=4, inner_steps=30, rounds=8, batch=8, seq_len=64, hidden=64, layers=2,
                          corpus_bytes=3_000_000)  # fmt: skip
    else:
        setting = Setting(workers=4, inner_steps=50, rounds=30, batch=16, seq_len=128, hidden=128, layers=4,
                          corpus_bytes=20_000_000)  # fmt: skip
    overrides = {
        name: getattr(args, name)
        for name in ("inner_steps", "rounds", "hidden", "layers")
        if getattr(args, name) is not None
    }
    setting = dataclasses.replace(setting, **overrides)
    started = time.perf_counter()
    config, tokens, samplers, holdout = prepare_corpus(setting)
    # Every method decays to 10% over its own steps; DiLoCo's inner steps follow the same schedule.
    inner = DiLoCoConfig(
        inner_lr=args.inner_lr,
        warmup_steps=setting.inner_steps // 2,
        total_inner_steps=setting.steps,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
    )
    numel = sum(p.numel() for p in init_model(config, 0).parameters())
    print(f"model: {numel / 1e6:.2f}M parameters, {len(tokens) / 1e6:.1f}M corpus tokens; "
          f"{setting.workers} workers x {setting.steps} steps x {setting.batch}x{setting.seq_len} tokens; "
          f"H={setting.inner_steps}")  # fmt: skip

    curves: dict[str, list] = {"ddp": [], "diloco": [], "single": []}
    results = {
        "ddp": train_ddp(setting, config, samplers(), inner, holdout, curves["ddp"]),
        "diloco": train_diloco(setting, config, samplers(), inner, holdout, curves["diloco"]),
    }
    if not args.skip_single:
        results["single"] = train_single(setting, config, samplers()[0], inner, holdout, curves["single"])
    print(f"{'method':<8} {'eval loss':>10} {'MB sent/member':>15}")
    for name, (loss, sent) in results.items():
        print(f"{name:<8} {loss:>10.4f} {sent / 1e6:>15.2f}")
    print(f"time: {time.perf_counter() - started:.1f} s")
    if not args.quick:
        per_point = {name: results[name][1] / max(1, len(curves[name])) for name in results}
        curves = {name: curves[name] for name in results}
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(curves, per_point, args.plot)
    loss_ratio = results["diloco"][0] / results["ddp"][0]
    bytes_ratio = results["diloco"][1] / results["ddp"][1]
    print(f"diloco loss_ratio_vs_ddp={loss_ratio:.4f} bytes_ratio_vs_ddp={bytes_ratio:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

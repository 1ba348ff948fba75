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
- streaming DiLoCo (Douillard et al. 2025, arXiv:2501.18512): the same 4 workers and H,
  the model in P fragments (blocks strided over depth), one fragment synced every H/P
  steps with its exchange overlapping tau inner steps and the result mixed back
  (alpha = 0.5), through swarm.training.streaming's own ``StreamingReplica``; so the
  same tokens and the same total bytes as DiLoCo, and 1/P of its peak bytes per sync.
  Also with eager updates (arXiv:2502.12996), and with 4-bit outer gradients: our
  blockwise NF4 against the paper's E3M0 float4 (same block of 64 and fp32 scale).
- single: one worker with the same per-step batch, seeing the same total tokens.

Workers run one after another in this process: this measures the algorithm, not the
network (benchmarks/allreduce.py measures that).

Last line: ``diloco loss_ratio_vs_ddp=<plain> streaming_loss_ratio_vs_ddp=<f>
bytes_ratio_vs_ddp=<f> peak_bytes_ratio=<streaming peak / plain peak>`` (bytes of the
streaming run; plain DiLoCo sends the same total).
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

from kernels import (
    dequantize_blockwise_4bit,
    dequantize_blockwise_int8,
    quantize_blockwise_4bit,
    quantize_blockwise_int8,
)
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
from swarm.training.replica import Replica
from swarm.training.streaming import StreamingConfig, StreamingReplica
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


def nf4_round_trip(values: torch.Tensor) -> torch.Tensor:
    """Our 4-bit blockwise codec (NF4 levels, one fp32 absmax per 64 values)."""
    packed, scales = quantize_blockwise_4bit(values, BLOCK)
    return dequantize_blockwise_4bit(packed, scales, values.numel(), BLOCK)


def e3m0_round_trip(values: torch.Tensor) -> torch.Tensor:
    """The Streaming DiLoCo paper's E3M0 float4 (sign, 3 exponent bits, no mantissa) per block of
    64 with an fp32 absmax scale: magnitudes 0 and 2^-6 .. 2^0 of the scale, nearest in value."""
    padded = torch.nn.functional.pad(values, (0, -values.numel() % BLOCK)).view(-1, BLOCK)
    scale = padded.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    magnitude = padded.abs() / scale
    exponent = torch.floor(torch.log2(magnitude.clamp_min(2.0**-7))).clamp(-6, 0)
    low = torch.pow(2.0, exponent)
    rounded = torch.where(magnitude > 1.5 * low, 2 * low, low).clamp_max(1.0)
    rounded = torch.where(magnitude < 2.0**-7, torch.zeros_like(rounded), rounded)
    return (torch.sign(padded) * rounded * scale).view(-1)[: values.numel()]


CODECS = {"int8": (int8_round_trip, 1 + 4 / BLOCK), "nf4": (nf4_round_trip, 0.5 + 4 / BLOCK),
          "e3m0": (e3m0_round_trip, 0.5 + 4 / BLOCK)}  # fmt: skip
"""Outer-gradient codecs: round trip, and bytes per value on the wire (codes plus fp32 scales)."""


def average_like_the_all_reduce(pseudo_gradients: list[torch.Tensor], codec: str = "int8") -> torch.Tensor:
    """Each part quantized on its way to the reducer, averaged in fp32, quantized on the way back."""
    round_trip = CODECS[codec][0]
    numel = pseudo_gradients[0].numel()
    result = torch.empty(numel)
    for start, end in split_parts(numel, [1.0] * len(pseudo_gradients), BLOCK):
        accumulator = torch.zeros(end - start)
        for vector in pseudo_gradients:
            accumulator += round_trip(vector[start:end]) / len(pseudo_gradients)
        result[start:end] = round_trip(accumulator)
    return result


def exchange_bytes(setting, numel: int, codec: str = "int8") -> float:
    """Bytes one member sends to all-reduce ``numel`` values: 2 n (M-1)/M values on the wire."""
    return 2 * numel * (setting.workers - 1) / setting.workers * CODECS[codec][1]


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
    per_step = 2 * numel * (setting.workers - 1) / setting.workers * 4
    return evaluate(model, holdout), setting.steps * per_step, per_step


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
    peak = exchange_bytes(setting, outer.parameters.numel())
    return evaluate(replicas[0], holdout), setting.rounds * peak, peak


def train_streaming(setting, config, samplers, inner_config, holdout, curve, streaming, codec="int8"):
    """Streaming DiLoCo with ``streaming`` (P, tau, alpha, eager): workers step in lockstep; the
    average of a fragment started at step t is merged at step t + tau."""
    streams = []
    for sampler in samplers:
        replica = Replica(init_model(config, seed=0), inner_config)
        replica.sampler = sampler
        streams.append(StreamingReplica(replica, streaming))
    tokens, sent, peak, pending = 0, 0.0, 0.0, None

    def finish(pending) -> None:
        begun, average = pending
        for stream, (started, _, _) in zip(streams, begun, strict=True):
            stream.finish(started, average, members=setting.workers)

    for step in range(1, setting.steps + 1):
        for stream in streams:
            stream.replica.train_step(setting.batch)
            stream.add_samples(setting.batch)
        tokens += setting.workers * setting.batch * setting.seq_len
        if pending is not None and step >= pending[0][0][0].due_step:
            finish(pending)
            pending = None
        if step % streaming.sync_every == 0:
            if pending is not None:
                finish(pending)
            begun = [s.begin(s.next_fragment(), step + streaming.overlap_steps) for s in streams]
            average = average_like_the_all_reduce([vector for _, vector, _ in begun], codec)
            fragment_bytes = exchange_bytes(setting, average.numel(), codec)
            sent, peak = sent + fragment_bytes, max(peak, fragment_bytes)
            pending = (begun, average)
            if streaming.overlap_steps == 0:
                finish(pending)
                pending = None
        if step % setting.inner_steps == 0:
            curve.append((tokens, evaluate_global(config, streams[0].replica, holdout)))
    if pending is not None:
        finish(pending)
    return evaluate_global(config, streams[0].replica, holdout), sent, peak


def evaluate_global(config, replica, holdout) -> float:
    """Held-out loss of ``theta_global`` (every member holds the same one)."""
    model = init_model(config, seed=0)
    load_flat_parameters_(model, replica.outer.parameters.detach())
    return evaluate(model, holdout)


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
    return evaluate(model, holdout), 0.0, 0.0


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
        "--quick", action="store_true", help="small setting: about 17 CPU-minutes (~9 min on 2 idle cores)"
    )
    parser.add_argument(
        "--plot", type=Path, default=Path("docs/diloco.png"), help="where the loss curves go (PNG)"
    )
    parser.add_argument("--fragments", type=int, default=2, help="streaming: P fragments (at most --layers)")
    parser.add_argument("--overlap-steps", type=int, default=1, help="streaming: tau, overlapped inner steps")
    parser.add_argument(
        "--mix-alpha", type=float, default=0.5, help="streaming: weight of the local fragment"
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

    streaming = StreamingConfig(
        fragments=args.fragments, overlap_steps=args.overlap_steps, mix_alpha=args.mix_alpha,
        inner_steps=setting.inner_steps,
    )  # fmt: skip
    eager = dataclasses.replace(streaming, eager=True)
    runs = {
        "ddp": lambda curve: train_ddp(setting, config, samplers(), inner, holdout, curve),
        "diloco": lambda curve: train_diloco(setting, config, samplers(), inner, holdout, curve),
        "streaming": lambda curve: train_streaming(
            setting, config, samplers(), inner, holdout, curve, streaming
        ),
        "eager": lambda curve: train_streaming(setting, config, samplers(), inner, holdout, curve, eager),
        "streaming-nf4": lambda curve: train_streaming(
            setting, config, samplers(), inner, holdout, curve, streaming, "nf4"
        ),
        "streaming-e3m0": lambda curve: train_streaming(
            setting, config, samplers(), inner, holdout, curve, streaming, "e3m0"
        ),
    }
    if not args.skip_single:
        runs["single"] = lambda curve: train_single(setting, config, samplers()[0], inner, holdout, curve)
    curves: dict[str, list] = {name: [] for name in runs}
    results = {name: run(curves[name]) for name, run in runs.items()}
    print(f"P={streaming.fragments} fragments, tau={streaming.overlap_steps} overlap steps, "
          f"alpha={streaming.mix_alpha}; 4-bit runs: outer gradients in 4 bits, fp32 accumulation")  # fmt: skip
    print(f"{'method':<15} {'eval loss':>10} {'MB sent/member':>15} {'peak MB/sync':>13}")
    for name, (loss, sent, peak) in results.items():
        print(f"{name:<15} {loss:>10.4f} {sent / 1e6:>15.2f} {peak / 1e6:>13.3f}")
    print(f"time: {time.perf_counter() - started:.1f} s")
    per_point = {name: results[name][1] / max(1, len(curves[name])) for name in results}
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, per_point, args.plot)
    ddp_loss, ddp_bytes = results["ddp"][0], results["ddp"][1]
    loss_ratio = results["diloco"][0] / ddp_loss
    streaming_ratio = results["streaming"][0] / ddp_loss
    bytes_ratio = results["streaming"][1] / ddp_bytes
    peak_ratio = results["streaming"][2] / results["diloco"][2]
    print(f"diloco loss_ratio_vs_ddp={loss_ratio:.4f} streaming_loss_ratio_vs_ddp={streaming_ratio:.4f} "
          f"bytes_ratio_vs_ddp={bytes_ratio:.5f} peak_bytes_ratio={peak_ratio:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

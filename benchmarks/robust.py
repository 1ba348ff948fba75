"""Robust aggregation against a poisoning member: DiLoCo loss with and without the defence.

Four DiLoCo members train the same small model (the setting of ``benchmarks/diloco.py``);
member 3 attacks every round by sending its pseudo-gradient scaled x1000 (full mode
adds sign-flipped and NaN). At equal tokens, the held-out loss of

- ``clean``: nobody attacks, plain weighted mean (today's DiLoCo): the baseline;
- ``clean/<rule>``: nobody attacks, each robust rule: what the defence costs honest runs;
- ``undefended``: the attacker, plain mean;
- ``defended``: the attacker, the default rule of ``swarm train`` (validation, clipping,
  then the rule).

Each part of the vector is aggregated by :func:`swarm.training.robust.aggregate`, the
function every reducer runs, after the int8 round trip the wire applies (the result is
round-tripped too). Members run one after another in this process: this measures the
algorithm, not the network.

The generation half (``benchmarks/robust_generation.py``): three `swarm join` servers of
one model, one perturbing its outputs, clients with spot checks on at the recommended
fraction: after how many steps the liar is caught, and verified / unverified ms per token.

Last line: ``robust defended_loss_ratio=<f> undefended_loss_ratio=<f>
detected_within_steps=<n> verify_overhead_ratio=<f>``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.diloco import BLOCK, Setting, evaluate, int8_round_trip, prepare_corpus
from swarm.training.diloco import (
    DiLoCoConfig,
    OuterOptimizer,
    flatten_parameters,
    load_flat_parameters_,
    make_inner_optimizer,
)
from swarm.training.parts import split_parts
from swarm.training.robust import RobustConfig, aggregate
from swarm.training.trainer_config import TrainerConfig
from swarm.training.training_model import init_model, language_model_loss

ATTACKER = 3


def poison(pseudo_gradient: torch.Tensor, attack: str) -> torch.Tensor:
    if attack == "scale":
        return pseudo_gradient * 1000
    if attack == "flip":
        return -pseudo_gradient
    if attack == "nan":
        return torch.full_like(pseudo_gradient, float("nan"))
    return pseudo_gradient


def aggregate_like_the_reducers(pseudo_gradients, weights, robust: RobustConfig) -> torch.Tensor:
    numel = pseudo_gradients[0].numel()
    result = torch.empty(numel)
    for start, end in split_parts(numel, [1.0] * len(pseudo_gradients), BLOCK):
        contributions = {
            i: (weight, int8_round_trip(vector[start:end]))
            for i, (weight, vector) in enumerate(zip(weights, pseudo_gradients, strict=True))
        }
        result[start:end] = int8_round_trip(aggregate(contributions, robust).values)
    return result


def train(
    setting, config, samplers, inner_config, holdout, robust: RobustConfig, attack: str | None
) -> float:
    replicas = [init_model(config, seed=0) for _ in range(setting.workers)]
    outer = OuterOptimizer(flatten_parameters(replicas[0]), inner_config)
    optimizers = [make_inner_optimizer(replica, inner_config) for replica in replicas]
    for _ in range(setting.rounds):
        pseudo_gradients = []
        for index, (replica, sampler, (optimizer, schedule)) in enumerate(
            zip(replicas, samplers, optimizers, strict=True)
        ):
            for _ in range(setting.inner_steps):
                optimizer.zero_grad()
                language_model_loss(replica, sampler.next_batch(setting.batch)).backward()
                optimizer.step()
                schedule.step()
            pseudo_gradient = outer.pseudo_gradient(flatten_parameters(replica))
            if attack and index == ATTACKER:
                pseudo_gradient = poison(pseudo_gradient, attack)
            pseudo_gradients.append(pseudo_gradient)
        weights = [float(setting.inner_steps * setting.batch)] * setting.workers
        new_global = outer.step(aggregate_like_the_reducers(pseudo_gradients, weights, robust))
        for replica in replicas:
            load_flat_parameters_(replica, new_global)
    loss = evaluate(replicas[0], holdout)
    return loss if math.isfinite(loss) else float("inf")


def _generation_part(quick: bool, fraction: float | None) -> tuple[int, float]:
    """Runs ``benchmarks/robust_generation.py`` with a bootstrap DHT node of its own."""
    from benchmarks.robust_generation import run_generation_part
    from peers.processes import ProcessGroup
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity

    bootstrap = SwarmDHT(
        Identity.generate(), DHTConfig(swarm_name="swarm", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
    )
    bootstrap.start()
    with tempfile.TemporaryDirectory(prefix="swarm-robust-") as tmp:
        group = ProcessGroup(Path(tmp))
        try:
            return run_generation_part(
                Path(tmp), [str(m) for m in bootstrap.visible_maddrs()], group, quick=quick, fraction=fraction
            )
        finally:
            group.close()
            bootstrap.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small setting, x1000 attack only")
    parser.add_argument("--rounds", type=int, help="outer rounds (default: 6 quick, 20 full)")
    parser.add_argument(
        "--generation-only", action="store_true", help="skip the DiLoCo half (prints n/a for it)"
    )
    parser.add_argument("--verify-fraction", type=float, default=None,
                        help="spot-check fraction of the generation half (default: the recommended one)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)  # on shared cores, two threads ran 16x slower per step (barrier spinning)
    if args.generation_only:
        detected, overhead = _generation_part(args.quick, args.verify_fraction)
        print(f"robust defended_loss_ratio=n/a undefended_loss_ratio=n/a detected_within_steps={detected} "
              f"verify_overhead_ratio={overhead:.3f}")  # fmt: skip
        return 0
    torch.manual_seed(0)
    if args.quick:
        setting = Setting(workers=4, inner_steps=30, rounds=args.rounds or 6, batch=8, seq_len=64, hidden=64,
                          layers=2, corpus_bytes=2_000_000)  # fmt: skip
        attacks = ["scale"]
    else:
        setting = Setting(workers=4, inner_steps=50, rounds=args.rounds or 20, batch=16, seq_len=128,
                          hidden=128, layers=4, corpus_bytes=10_000_000)  # fmt: skip
        attacks = ["scale", "flip", "nan"]
    started = time.perf_counter()
    config, _tokens, samplers, holdout = prepare_corpus(setting)
    inner = DiLoCoConfig(
        inner_lr=2e-3, warmup_steps=setting.inner_steps // 2, total_inner_steps=setting.steps
    )
    trainer_defaults = TrainerConfig(model="-")
    default = trainer_defaults.robust

    def run(robust, attack=None) -> float:
        began = time.perf_counter()
        loss = train(setting, config, samplers(), inner, holdout, robust, attack)
        print(f"  {robust.rule:<14} attack={attack or '-':<6} loss {loss:.4f} "
              f"({time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip
        return loss

    print(f"4 members x {setting.rounds} rounds x H={setting.inner_steps}; attacker: member {ATTACKER}; "
          f"default rule: {default.rule}", flush=True)  # fmt: skip
    losses = {"clean": run(RobustConfig(rule="mean"))}
    for rule in ("centered_clip", "trimmed_mean"):
        losses[f"clean/{rule}"] = run(RobustConfig(rule=rule))
    for attack in attacks:
        losses[f"undefended/{attack}"] = run(RobustConfig(rule="mean"), attack)
        losses[f"defended/{attack}"] = run(default, attack)
    clean = losses["clean"]
    print(f"{'run':<28} {'eval loss':>10} {'/ clean':>8}")
    for name, loss in losses.items():
        print(f"{name:<28} {loss:>10.4f} {loss / clean:>8.3f}")
    print(f"time: {time.perf_counter() - started:.1f} s")
    defended = max(losses[f"defended/{attack}"] for attack in attacks) / clean
    undefended = min(losses[f"undefended/{attack}"] for attack in attacks) / clean
    detected, overhead = _generation_part(args.quick, args.verify_fraction)
    print(f"time in all: {time.perf_counter() - started:.1f} s; load average: {os.getloadavg()[0]:.2f}")
    print(
        f"robust defended_loss_ratio={defended:.4f} undefended_loss_ratio={undefended:.4f} "
        f"detected_within_steps={detected} verify_overhead_ratio={overhead:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start a DiLoCo training run in one terminal and join it from another.

    python examples/train_together.py --model ./my-model                      # terminal 1
    #   prints: initial peer for others: /ip4/127.0.0.1/tcp/.../p2p/12D3Koo...
    python examples/train_together.py --model ./my-model --join /ip4/...      # terminal 2

The first member initialises the run from the model's config (random init); a joiner
downloads the current parameters and outer-optimizer state from a member and
contributes from its next round. Ctrl-C leaves after the current round.
"""

import argparse

from peers.options import PeerOptions, configure_logging, run_async
from peers.train import train
from swarm.training.trainer_config import TrainerConfig


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json, tokenizer.json)")
    parser.add_argument("--join", nargs="*", default=[], help="multiaddr of a member (omit to start the run)")
    parser.add_argument(
        "--rounds", type=int, default=0, help="leave after this many rounds (0: until Ctrl-C)"
    )
    parser.add_argument("--round-seconds", type=float, default=20.0, help="seconds of inner steps per round")
    args = parser.parse_args()
    configure_logging()
    config = TrainerConfig(
        run="example",
        model=args.model,
        init="random",
        round_seconds=args.round_seconds,
        max_rounds=args.rounds,
        seq_len=64,
        batch_size=8,
        inner_lr=2e-3,
        warmup_steps=20,
        corpus_bytes=1_000_000,
        matchmaking_seconds=10.0,
    )
    options = PeerOptions(initial_peers=tuple(args.join), swarm="example")
    return run_async(lambda: train(config, options))


if __name__ == "__main__":
    raise SystemExit(main())

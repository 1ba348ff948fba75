"""`swarm generate`: stream a model's continuation of a prompt to the terminal."""

from __future__ import annotations

import argparse
import logging
import sys

from peers.options import configure_logging, run_async

logger = logging.getLogger("swarm.generate")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a model served by the swarm",
        description="Stream a continuation of PROMPT, computed by the swarm's servers.",
    )
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--model", required=True, help="checkpoint folder (tokenizer, embeddings, head)")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of swarm members")
    parser.add_argument("--swarm", default="swarm", help="swarm name (default: 'swarm')")
    parser.add_argument("--swarm-key", default="", help="file with a private swarm's key (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k best (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0, off)")
    parser.add_argument("--stop", nargs="*", default=[], help="texts that end generation (default: none)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    return run_async(lambda: _generate(args))


async def _generate(args: argparse.Namespace) -> int:
    from swarm.identity import load_swarm_key
    from swarm.serving import RemoteModel, Sampling
    from transport.errors import SwarmError

    try:
        swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                            tuple(args.stop), args.seed)  # fmt: skip
        async with RemoteModel.connect(args.model, args.initial_peers, swarm=args.swarm,
                                       swarm_key=swarm_key) as model:  # fmt: skip
            async for piece in model.stream(args.prompt, args.max_new_tokens, sampling=sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except (SwarmError, ValueError) as error:
        logger.error("generation failed: %s", error)
        return 1
    return 0

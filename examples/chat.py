"""A multi-turn chat: one inference session keeps the servers' attention caches between turns,
so each turn sends only its new tokens through the chain.

    python examples/chat.py --model ./my-model --initial-peers /ip4/1.2.3.4/tcp/31330/p2p/12D3Koo...
    python examples/chat.py ... --turns "hello" "tell me more"     # non-interactive
"""

import argparse
import asyncio
import sys

from swarm.serving import RemoteModel, Sampling


def user_turns(args: argparse.Namespace):
    if args.turns:
        yield from args.turns
        return
    print("(empty line or Ctrl-D to quit)")
    for line in sys.stdin:
        if not line.strip():
            return
        yield line.strip()


async def main(args: argparse.Namespace) -> None:
    async with (
        RemoteModel.connect(args.model, initial_peers=args.initial_peers, swarm=args.swarm) as model,
        model.inference_session(max_length=args.max_length) as session,
    ):
        for turn in user_turns(args):
            print(f"you: {turn}\nmodel: ", end="", flush=True)
            prompt = f"User: {turn}\nAssistant:"
            async for piece in model.stream(
                prompt,
                max_new_tokens=args.max_new_tokens,
                sampling=Sampling(temperature=0.7, top_k=40, seed=0),
                session=session,
            ):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of swarm members")
    parser.add_argument("--swarm", default="swarm", help="swarm name")
    parser.add_argument("--turns", nargs="*", help="user turns (default: read lines from stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=1024, help="tokens the session may hold in all")
    asyncio.run(main(parser.parse_args()))

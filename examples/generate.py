"""Generate text through a swarm, streamed as it is made.

    python examples/generate.py --model ./my-model --initial-peers /ip4/1.2.3.4/tcp/31330/p2p/12D3Koo... \
        --prompt "def fibonacci(n):"

The model directory only needs config.json, tokenizer.json and the client's pieces
(embeddings, final norm, LM head); the servers hold the transformer blocks.
"""

import argparse
import asyncio

from swarm.serving import RemoteModel


async def main(args: argparse.Namespace) -> None:
    async with RemoteModel.connect(args.model, initial_peers=args.initial_peers, swarm=args.swarm) as model:
        print(args.prompt, end="", flush=True)
        async for piece in model.stream(
            args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=0.9
        ):
            print(piece, end="", flush=True)
        print()
        # Batched prompts run as concurrent sessions (servers batch their steps together).
        for text in await model.generate(["import ", "class "], max_new_tokens=8):
            print(repr(text))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of swarm members")
    parser.add_argument("--swarm", default="swarm", help="swarm name")
    parser.add_argument("--prompt", default="def main():\n")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    asyncio.run(main(parser.parse_args()))

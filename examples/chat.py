"""A multi-turn chat with the model's own chat template (from its tokenizer_config.json, or
the GGUF file's metadata); each answer ends at the model's end-of-turn token.

    python examples/chat.py --model ./SmolLM2-135M-Instruct.Q4_1.gguf --initial-peers /ip4/1.2.3.4/tcp/31330/p2p/12D3Koo...
    python examples/chat.py ... --turns "hello" "tell me more"     # non-interactive

Every turn renders the whole conversation and sends it through the swarm: the template
decides how past turns look (some rewrite them), so the prompt is always exactly what
the model was trained on.
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
    sampling = Sampling(temperature=args.temperature, top_k=40, seed=0)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    async with RemoteModel.connect(args.model, initial_peers=args.initial_peers, swarm=args.swarm) as model:
        for turn in user_turns(args):
            messages.append({"role": "user", "content": turn})
            print(f"you: {turn}\nmodel: ", end="", flush=True)
            answer = []
            async for piece in model.stream_chat(messages, args.max_new_tokens, sampling=sampling):
                answer.append(piece)
                print(piece, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint: a folder or a .gguf file")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of swarm members")
    parser.add_argument("--swarm", default="swarm", help="swarm name")
    parser.add_argument("--system", default=None, help="a system message (default: none)")
    parser.add_argument("--turns", nargs="*", help="user turns (default: read lines from stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    asyncio.run(main(parser.parse_args()))

"""`swarm generate`: stream a model's continuation of a prompt (or its chat answer) to the terminal.

PROMPT may come anywhere on the line, also right after ``--initial-peers``: a multiaddr
always starts with "/", so words after the peers that do not are the prompt (argparse
alone would take them as more peers). ``--stop`` takes one text per flag, for the same
reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from peers.options import configure_logging, run_async

logger = logging.getLogger("swarm.generate")
# ClientConfig.verify_fraction's help; the CLI does not import torch (settings.py) at start-up
VERIFY_HELP = (
    "share of steps after which another server holding the same blocks recomputes the outputs since "
    "the last check and compares; a server caught lying is banned, reported, and the generation rerun "
    "without it (0: off; 0.125: a liar is caught within 10 steps; output is shown once checked)"
)

DESCRIPTION = """\
Stream a continuation of PROMPT computed by the swarm's servers, or with --chat the
model's answer to PROMPT as a user message (the checkpoint's own chat template).

  swarm generate --model ./SmolLM2.gguf --initial-peers MULTIADDR "Once upon a time"
  swarm generate --model ./SmolLM2.gguf --initial-peers MULTIADDR --chat "What is a swarm?"
  swarm generate --model DIR --initial-peers MULTIADDR --stop "\\n\\n" --stop "###" "Q: ..." """


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a model served by the swarm",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", nargs="?", help="the text to continue (with --chat: the user's message)")
    parser.add_argument(
        "--model", required=True, help="checkpoint: a folder (tokenizer, embeddings, head) or a .gguf"
    )
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of swarm members")
    parser.add_argument("--swarm", default="swarm", help="swarm name (default: 'swarm')")
    parser.add_argument("--swarm-key", default="", help="file with a private swarm's key (default: none)")
    parser.add_argument(
        "--chat", action="store_true", help="answer PROMPT as a chat message (model's template)"
    )
    parser.add_argument("--system", default=None, help="with --chat: a system message (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    defaults = "(default: the checkpoint's generation_config.json, else {})"
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy " + defaults.format("0"))
    parser.add_argument(
        "--top-k", type=int, default=None, help="sample among the k best " + defaults.format("all")
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling mass " + defaults.format("off")
    )
    parser.add_argument("--repetition-penalty", type=float, default=None, help=defaults.format("1.0, off"))
    parser.add_argument("--stop", action="append", default=[], help="a text that ends generation; repeat the flag "
                        "for several (default: none)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("--speculative", choices=("lookup", "draft"), default=None,
                        help="draft tokens on this machine and let the swarm verify several per pass: "
                        "lookup (prompt lookup) or draft (--draft-model); greedy output is unchanged, "
                        "sampled output keeps its distribution (default: off)")  # fmt: skip
    parser.add_argument("--draft-model", default=None, help="with --speculative draft: a small checkpoint "
                        "folder with the same tokenizer (default: none)")  # fmt: skip
    parser.add_argument("--adapter", default="", help="a PEFT adapter folder (LoRA or soft prompt, e.g. from "
                        "`swarm finetune`) the servers apply in this generation's sessions (default: none)")  # fmt: skip
    parser.add_argument("--verify-fraction", type=float, default=None,
                        help=VERIFY_HELP + " (default: ClientConfig's, 0)")  # fmt: skip
    parser.add_argument("--activations", default="float32", help="how hidden states travel to and between the "
                        "servers: float32 (exact), bf16 or int8 (fewer bytes, see the README) (default: float32)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=main, fix_arguments=lambda args: split_prompt_from_peers(args, parser))


def split_prompt_from_peers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Moves words that ``--initial-peers`` took but are no multiaddr into the prompt."""
    peers = [value for value in args.initial_peers if value.startswith("/")]
    words = [value for value in args.initial_peers if not value.startswith("/")]
    if words and args.prompt is not None:
        parser.error(f"not multiaddrs (they start with '/'): {' '.join(words)}")
    if not peers:
        parser.error(
            "--initial-peers needs at least one multiaddr, e.g. /ip4/1.2.3.4/tcp/31330/p2p/12D3Koo..."
        )
    args.initial_peers = peers
    if words:
        args.prompt = " ".join(words)
    if args.prompt is None:
        parser.error("the following arguments are required: prompt")


def main(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    return run_async(lambda: _generate(args))


async def _generate(args: argparse.Namespace) -> int:
    from kernels import ChatTemplateError, MissingTokenizerError
    from swarm.identity import load_swarm_key
    from swarm.serving import ClientConfig, RemoteModel, Sampling
    from transport.errors import SwarmError

    try:
        swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
        config = ClientConfig(activations=args.activations)
        if args.verify_fraction is not None:
            config = dataclasses.replace(config, verify_fraction=args.verify_fraction)
        async with RemoteModel.connect(args.model, args.initial_peers, swarm=args.swarm,
                                       swarm_key=swarm_key, config=config) as model:  # fmt: skip
            given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                     "repetition_penalty": args.repetition_penalty}  # fmt: skip
            chosen = {**model.sampling_defaults, **{k: v for k, v in given.items() if v is not None}}
            sampling = Sampling(**chosen, stop=tuple(args.stop), seed=args.seed)
            adapter = args.adapter or None  # the servers' sessions apply it (session_adapters.py)
            options = {"adapter": adapter, "speculative": args.speculative, "draft_model": args.draft_model}
            if args.chat:
                messages = [{"role": "system", "content": args.system}] if args.system else []
                messages.append({"role": "user", "content": args.prompt})
                stream = model.stream_chat(messages, args.max_new_tokens, sampling=sampling, **options)
            else:
                stream = model.stream(args.prompt, args.max_new_tokens, sampling=sampling, **options)
            async for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except (MissingTokenizerError, ChatTemplateError) as error:
        logger.error("%s", error)
        return 2
    except (SwarmError, ValueError, OSError) as error:
        logger.error("generation failed: %s", error)
        return 1
    return 0

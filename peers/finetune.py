"""`swarm finetune`: train LoRA adapters or a soft prompt through the swarm's frozen blocks.

The servers run the blocks forward and backward; this process owns the trainable
parameters and the optimizer (``swarm/serving/finetune_run.py``), shows a progress
line with the loss and tokens/s, saves every ``--save-every`` steps and at the end in
the PEFT layout, and on Ctrl-C (or SIGTERM) saves and exits; run it again with the same
``--out`` to resume.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from peers.options import configure_logging

logger = logging.getLogger("swarm.finetune")


def register(subparsers) -> None:
    from peers.options import add_config_arguments
    from swarm.serving.finetune_run import FinetuneConfig

    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model served by the swarm (LoRA or a soft prompt, owned by this client)",
        description="Train LoRA adapters or a soft prompt through the swarm; save them in the PEFT layout.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (tokenizer, embeddings, head)")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of swarm members")
    parser.add_argument("--data", nargs="+", required=True, help="text files to train on")
    parser.add_argument(
        "--out", required=True, help="adapter folder (PEFT layout); resumed if it holds a run"
    )
    parser.add_argument("--swarm", default="swarm", help="swarm name (default: 'swarm')")
    parser.add_argument("--swarm-key", default="", help="file with a private swarm's key (default: none)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_config_arguments(parser, FinetuneConfig)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from peers.options import config_from_arguments
    from swarm.identity import load_swarm_key
    from swarm.serving.finetune_run import FinetuneConfig, FinetuneRun, draw_batch, load_token_stream
    from swarm.serving.remote_training import connect_in_thread
    from transport.errors import SwarmError

    configure_logging(args.verbose)
    try:
        config = config_from_arguments(FinetuneConfig, args)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
    try:
        with connect_in_thread(
            args.model, args.initial_peers, swarm=args.swarm, swarm_key=swarm_key
        ) as client:
            stream = load_token_stream(client.model.tokenizer, args.data)
            run = FinetuneRun(client.model, config, args.out)
            if run.step:
                logger.info("resuming from %s at step %d", args.out, run.step)
            try:
                _train(run, stream, config, draw_batch)
            except KeyboardInterrupt:
                run.save()
                print(f"\ninterrupted: saved step {run.step} to {args.out}", file=sys.stderr, flush=True)
                return 130
            run.save()
            print(f"\ndone: {run.step} steps, adapter saved to {args.out}", file=sys.stderr, flush=True)
    except (SwarmError, ValueError, OSError) as error:
        logger.error("fine-tuning failed: %s", error)
        return 1
    return 0


def _train(run, stream, config, draw_batch) -> None:
    end = "\r" if sys.stderr.isatty() else "\n"
    while run.step < config.steps:
        rows = draw_batch(stream, config, run.step)
        started = time.perf_counter()
        loss = run.train_step(rows)
        rate = rows.shape[0] * (rows.shape[1] - 1) / (time.perf_counter() - started)
        done = int(30 * run.step / config.steps)
        bar = "#" * done + "." * (30 - done)
        print(f"[{bar}] step {run.step}/{config.steps} loss {loss:.4f} tokens/s {rate:.0f}", end=end,
              file=sys.stderr, flush=True)  # fmt: skip
        if config.save_every and run.step % config.save_every == 0:
            run.save()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

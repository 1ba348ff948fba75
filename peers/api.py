"""`swarm api`: an OpenAI-compatible HTTP API in front of a swarm.

The process joins the swarm's DHT as a client, loads the checkpoint's small pieces
(tokenizer, chat template, embeddings, head), serves the routes of
:mod:`peers.api_routes` and prints ``API ready at http://HOST:PORT/v1`` once it takes
requests. Ctrl-C / SIGTERM stops it (open streams are cut, their sessions closed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from peers.generate import VERIFY_HELP
from peers.options import (
    add_config_arguments,
    config_from_arguments,
    configure_logging,
    install_stop_handlers,
    run_async,
)

logger = logging.getLogger("swarm.api")

DESCRIPTION = """\
Serve the swarm's model over the OpenAI HTTP API (/v1/models, /v1/completions,
/v1/chat/completions with streaming; /health, /metrics). Point any OpenAI client at it:

  swarm api --model CHECKPOINT --initial-peers MULTIADDR --port 8000
  python -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-");
             print(c.chat.completions.create(model="MODEL", messages=[{"role": "user", "content": "Hi"}]))'

The model id is --model-name (default: the checkpoint's file or folder name)."""


@dataclass(frozen=True)
class ApiConfig:
    """What `swarm api` serves and how."""

    model: str = field(
        default="", metadata={"help": "checkpoint: a folder (config.json, tokenizer.json) or a .gguf"}
    )
    initial_peers: tuple[str, ...] = field(default=(), metadata={"help": "multiaddrs of swarm members"})
    swarm: str = field(default="swarm", metadata={"help": "swarm name"})
    swarm_key: str = field(default="", metadata={"help": "file with a private swarm's key"})
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: all interfaces)"}
    )
    port: int = field(default=8000, metadata={"help": "HTTP port; 0 picks a free one"})
    api_key: str = field(
        default="",
        metadata={"help": "require 'Authorization: Bearer KEY' (default: $SWARM_API_KEY, else none)"},
    )
    model_name: str = field(
        default="", metadata={"help": "model id clients send (default: the checkpoint's name)"}
    )
    default_max_tokens: int = field(
        default=512, metadata={"help": "tokens generated when a request sets no max"}
    )
    max_n: int = field(default=16, metadata={"help": "largest n (choices per request) accepted"})
    route_wait: float = field(
        default=15.0, metadata={"help": "seconds to wait for servers covering every block before a 503"}
    )
    speculative: str = field(
        default="lookup",
        metadata={"help": "greedy requests draft by prompt lookup and the swarm verifies the drafts "
                  "(same tokens, fewer passes; drafting stops while it does not pay): lookup or off"},
    )  # fmt: skip
    verify_fraction: float = field(
        default=0.0,  # ClientConfig.verify_fraction's default (settings.py needs torch; the CLI starts without)
        metadata={"help": VERIFY_HELP},
    )
    activations: str = field(
        default="float32",
        metadata={
            "help": "how hidden states travel to and between the servers: float32 (exact), bf16 or int8"
        },
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a checkpoint folder or .gguf file")
        if not self.initial_peers:
            raise ValueError("--initial-peers is required: a multiaddr printed by `swarm join`")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        for name in ("default_max_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.route_wait <= 0:
            raise ValueError("--route-wait must be positive")
        if self.speculative not in ("lookup", "off"):
            raise ValueError(f"--speculative must be lookup or off, got {self.speculative!r}")
        if not 0 <= self.verify_fraction <= 1:
            raise ValueError("--verify-fraction must be in [0, 1]")
        from transport.codecs import WIRE_FORMATS

        if self.activations not in WIRE_FORMATS:
            raise ValueError(f"--activations must be one of {sorted(WIRE_FORMATS)}, got {self.activations!r}")

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        path = Path(self.model.rstrip("/"))
        return path.stem if path.suffix.lower() == ".gguf" else path.name


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "api",
        help="serve the swarm's model over the OpenAI HTTP API",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, ApiConfig)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    try:
        config = config_from_arguments(ApiConfig, args)
        if not config.api_key and os.environ.get("SWARM_API_KEY"):
            config = dataclasses.replace(config, api_key=os.environ["SWARM_API_KEY"])
        if not os.path.exists(config.model):
            raise ValueError(f"--model {config.model}: no such file or folder")
    except ValueError as error:
        logger.error("%s", error)
        return 2
    return run_async(lambda: serve(config))


async def serve(config: ApiConfig, stop: asyncio.Event | None = None) -> int:
    """Runs the API until ``stop`` is set (or SIGINT/SIGTERM). Returns the exit code."""
    from aiohttp import web

    from peers.api_engine import GenerationEngine
    from peers.api_routes import ApiRoutes
    from swarm.identity import load_swarm_key
    from swarm.serving import ClientConfig, RemoteModel
    from transport.errors import SwarmError

    stop = stop or asyncio.Event()
    install_stop_handlers(stop, asyncio.get_running_loop())
    try:
        swarm_key = load_swarm_key(config.swarm_key) if config.swarm_key else None
        client = ClientConfig(route_wait=config.route_wait, activations=config.activations,
                              verify_fraction=config.verify_fraction)  # fmt: skip
        model = await RemoteModel.connect(config.model, config.initial_peers, swarm=config.swarm,
                                          swarm_key=swarm_key, config=client)  # fmt: skip
    except (SwarmError, ValueError, OSError) as error:
        logger.error("cannot start the API: %s", error)
        return 1
    try:
        if model.tokenizer is None:
            logger.error("cannot start the API: %s", model.missing_tokenizer)
            return 1
        engine = GenerationEngine(model, model.tokenizer, config.default_max_tokens,
                                  speculative=None if config.speculative == "off" else config.speculative)  # fmt: skip
        routes = ApiRoutes(engine, config.served_name, config.api_key, config.max_n)
        # handler_cancellation: a client that goes away cancels its handler, which closes its sessions.
        runner = web.AppRunner(routes.application(), access_log=None, handler_cancellation=True)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
            port = runner.addresses[0][1]
            print(
                f"API ready at http://{config.host}:{port}/v1 serving model {config.served_name!r}",
                flush=True,
            )
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        await model.close()
    return 0

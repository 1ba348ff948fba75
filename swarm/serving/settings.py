"""Configuration of both halves of inference, frozen dataclasses whose field docs are help.

``ClientConfig``: deadlines and failover policy of the client (``RemoteModel``).
``ServerConfig``: what an ``InferenceServer`` serves and how; `swarm join` generates
its flags from the fields. ``resolve_device`` / ``resolve_dtype`` turn its ``auto``
values into concrete ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transport import WIRE_FORMATS


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to the servers and survives their failures."""

    step_timeout: float = field(
        default=120.0,
        metadata={
            "help": "most seconds for one step on one server (covers waiting for the previous hop's "
            "push); the ceiling of the step deadline, and the deadline on a server not yet measured"
        },
    )
    step_deadline_factor: float = field(
        default=5.0,
        metadata={
            "help": "a step's deadline on a server is this many times the slowest of its recent "
            "steps (scaled by tokens), so a hung server is given up on in seconds"
        },
    )
    step_deadline_floor: float = field(
        default=2.0, metadata={"help": "seconds a step's deadline never goes below (jitter, batching)"}
    )
    connect_timeout: float = field(
        default=3.0,
        metadata={
            "help": "seconds to connect to a server (TCP + encrypted handshake); a refused "
            "connection fails at once, so a dead server's record costs little"
        },
    )
    open_timeout: float = field(default=15.0, metadata={"help": "seconds to open a session on a server"})
    route_wait: float = field(
        default=30.0,
        metadata={"help": "seconds to wait for a server to cover blocks that lost theirs before failing"},
    )
    route_poll: float = field(
        default=1.0, metadata={"help": "seconds between DHT lookups while waiting for a route"}
    )
    send_copies: bool = field(
        default=True,
        metadata={"help": "also send each hop's output to the next hop (in case the servers' push fails)"},
    )
    ban_seconds: float = field(
        default=15.0, metadata={"help": "first ban of a failed server, doubling on repeats"}
    )
    dht_timeout: float = field(default=15.0, metadata={"help": "seconds for one DHT lookup"})
    route_refresh: float = field(
        default=10.0,
        metadata={
            "help": "seconds between background refreshes of the client's live view of the servers "
            "(a ban or a failed open refreshes it at once); sessions open from it without a DHT lookup"
        },
    )
    activations: str = field(
        default="float32",
        metadata={
            "help": "how this client's hidden states travel, both ways and between its servers: "
            "float32 (exact), bf16 (half the bytes) or int8 (blockwise, ~3.8x fewer bytes); "
            "see the README for what each costs in accuracy"
        },
    )
    replay_attempts: int = field(
        default=3,
        metadata={"help": "replacement chains tried for a failed span when replacements fail during replay"},
    )
    verify_fraction: float = field(
        default=0.0,
        metadata={
            "help": "share of steps after which another holder of the same blocks recomputes the outputs "
            "since the last check and compares them (every round(1/f)-th step; 0: off; 0.125 catches a liar "
            "within 10 steps of its first wrong output; see swarm/serving/spot_checks.py)"
        },
    )

    def __post_init__(self) -> None:
        for name in (
            "step_timeout",
            "step_deadline_factor",
            "step_deadline_floor",
            "connect_timeout",
            "open_timeout",
            "route_wait",
            "route_poll",
            "ban_seconds",
            "dht_timeout",
            "route_refresh",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClientConfig.{name} must be positive")
        if not 0 <= self.verify_fraction <= 1:
            raise ValueError("ClientConfig.verify_fraction (--verify-fraction) must be in [0, 1]")
        if self.activations not in WIRE_FORMATS:
            raise ValueError(
                f"ClientConfig.activations must be one of {sorted(WIRE_FORMATS)}, got {self.activations!r}"
            )
        if self.replay_attempts < 1:
            raise ValueError("ClientConfig.replay_attempts must be at least 1")
        if self.step_deadline_floor > self.step_timeout:
            raise ValueError("ClientConfig.step_deadline_floor must not exceed step_timeout")


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "int8", "nf4", "int4", "keep")


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of one inference server (`swarm join` generates its flags from it)."""

    model: str = field(
        default="", metadata={"help": "checkpoint: a folder (config.json + safetensors) or a .gguf file"}
    )
    blocks: str = field(
        default="auto", metadata={"help": "blocks to serve, 'a:b' (half-open) or 'auto' (fill the weakest)"}
    )
    max_blocks: int = field(
        default=0,
        metadata={"help": "with --blocks auto: serve at most this many (0: as many as memory allows)"},
    )
    device: str = field(
        default="auto", metadata={"help": "auto|cpu|cuda|mps (auto: cuda, then mps, then cpu)"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto|float32|bfloat16|float16 (auto: bf16 on GPUs that have it, fp16 on older, fp32 on CPU)"
        },
    )
    quant: str = field(
        default="none",
        metadata={
            "help": "weight quantization: none|int8|nf4|int4, or keep (a GGUF's Q8_0/Q4_0 stay as stored)"
        },
    )
    cache_tokens: int = field(
        default=32768, metadata={"help": "attention-cache budget in tokens (rows x length) over all sessions"}
    )
    max_sessions_per_client: int = field(
        default=64, metadata={"help": "open sessions one client (one CURVE key) may hold on this server"}
    )
    client_cache_share: float = field(
        default=0.5,
        metadata={
            "help": "fraction of --cache-tokens one client may hold, so a greedy client leaves "
            "the rest to the others (1: no per-client limit)"
        },
    )
    mailbox_steps: int = field(
        default=4, metadata={"help": "pushed inputs one session holds ahead of its steps"}
    )
    session_idle_timeout: float = field(
        default=60.0, metadata={"help": "seconds without a step before a session and its cache are dropped"}
    )
    push_wait: float = field(
        default=30.0,
        metadata={"help": "seconds a step sent without its input waits for the previous server's push"},
    )
    max_batch_rows: int = field(
        default=64, metadata={"help": "rows of concurrent sessions batched into one forward"}
    )
    announce_period: float = field(default=20.0, metadata={"help": "seconds between DHT re-announcements"})
    record_ttl: float = field(default=60.0, metadata={"help": "lifetime of the DHT records in seconds"})
    drain_timeout: float = field(
        default=30.0, metadata={"help": "on SIGTERM, seconds to let open sessions finish before leaving"}
    )
    throughput_cache: str = field(
        default="~/.cache/swarm/throughput.json", metadata={"help": "file caching measured throughput"}
    )
    torch_threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    rebalance_period: float = field(
        default=300.0,
        metadata={
            "help": "with --blocks auto: mean seconds between checks whether other blocks need this "
            "server more (each wait is drawn from 0.5-1.5x; 0: never move)"
        },
    )
    throughput: float = field(
        default=0.0,
        metadata={"help": "tokens/s per block to announce instead of measuring (0: measure, cached)"},
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: the checkpoint folder to serve from")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.quant not in QUANTIZATIONS:
            raise ValueError(f"--quant must be one of {QUANTIZATIONS}, got {self.quant!r}")
        if not 0 < self.client_cache_share <= 1:
            raise ValueError("--client-cache-share must be in (0, 1]")
        if self.quant == "keep" and not self.model.lower().endswith(".gguf"):
            raise ValueError("--quant keep needs a .gguf --model (a folder holds no quantized weights)")
        for name in ("cache_tokens", "max_batch_rows", "max_sessions_per_client", "mailbox_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in ("rebalance_period", "throughput"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        for name in ("session_idle_timeout", "push_wait", "announce_period", "record_ttl", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.announce_period > self.record_ttl / 2:
            raise ValueError("--announce-period must be at most half of --record-ttl")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the best available accelerator, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 where the GPU supports it, float16 on older GPUs, float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32

"""``ClientConfig``: deadlines and failover policy of the inference client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to the servers and survives their failures."""

    step_timeout: float = field(
        default=120.0,
        metadata={"help": "seconds for one step on one server (covers waiting for the previous hop's push)"},
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
    replay_attempts: int = field(
        default=3,
        metadata={"help": "replacement chains tried for a failed span when replacements fail during replay"},
    )

    def __post_init__(self) -> None:
        for name in (
            "step_timeout",
            "open_timeout",
            "route_wait",
            "route_poll",
            "ban_seconds",
            "dht_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClientConfig.{name} must be positive")
        if self.replay_attempts < 1:
            raise ValueError("ClientConfig.replay_attempts must be at least 1")

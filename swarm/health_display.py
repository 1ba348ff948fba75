"""Untrusted values made safe to show: clipped text, short peer ids, finite numbers, alert entries.

Every string in the health snapshot comes from the DHT or MQTT, where a hostile peer may
publish megabytes or terminal escape sequences; the snapshot modules (``swarm.health``,
``swarm.health_runs``) pass each one through :func:`clip_text` or :func:`short_id`.
Readers still HTML-escape what they render.
"""

from __future__ import annotations

import math

MAX_TEXT = 80
"""Longest string from the DHT we show; hostile peers may publish megabytes."""
SHORT_ID_LENGTH = 10


def clip_text(value: object, limit: int = MAX_TEXT) -> str:
    """A display-safe length-bounded string (not HTML-escaped).

    Args:
        value: anything; non-strings become ``repr`` text.
        limit: the most characters kept.

    Returns:
        The text, cut with "…" when longer than ``limit``, control characters replaced.
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(char if char.isprintable() else "?" for char in text)


def short_id(peer_id: str) -> str:
    """The first :data:`SHORT_ID_LENGTH` characters of a peer id, for tables and labels."""
    return clip_text(peer_id, SHORT_ID_LENGTH + 1)[:SHORT_ID_LENGTH]


def finite(value: float) -> float:
    """``value`` as a float, or 0.0 if it is NaN or infinite (JSON has neither)."""
    return float(value) if math.isfinite(value) else 0.0


def alert(kind: str, severity: str, message: str) -> dict[str, str]:
    """One ``alerts`` entry of the snapshot; the message is clipped to 400 characters."""
    return {"kind": kind, "severity": severity, "message": clip_text(message, 400)}

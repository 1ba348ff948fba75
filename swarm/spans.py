"""Contiguous spans of transformer blocks, and the ``--blocks 4:8`` parser."""

from __future__ import annotations

import dataclasses

from swarm.swarm_errors import InvalidSpan


@dataclasses.dataclass(frozen=True, order=True)
class Span:
    """Blocks ``[start, end)`` of the model, half-open like a Python slice.

    Raises:
        InvalidSpan: ``start < 0`` or ``end <= start``.
    """

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.end, int)):
            raise InvalidSpan(f"span bounds must be integers, got {self.start!r}:{self.end!r}")
        if self.start < 0 or self.end <= self.start:
            raise InvalidSpan(f"span {self.start}:{self.end} is empty or negative")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def parse_span(text: str, n_blocks: int | None = None, flag: str = "--blocks") -> Span:
    """Parses an explicit span such as ``"4:8"`` (blocks 4, 5, 6, 7).

    ``":8"`` means ``0:8`` and ``"4:"`` means ``4:n_blocks``.

    Args:
        text: the span as typed by the user.
        n_blocks: number of blocks in the model; required for an open end, and checks bounds.
        flag: the option name to mention in errors.

    Returns:
        The span.

    Raises:
        InvalidSpan: the text does not parse or the span lies outside ``[0, n_blocks)``.
    """
    start_text, sep, end_text = text.strip().partition(":")
    if not sep:
        raise InvalidSpan(f"{flag} {text!r}: expected START:END, e.g. 4:8 for blocks 4..7")
    try:
        start = int(start_text) if start_text.strip() else 0
        if end_text.strip():
            end = int(end_text)
        elif n_blocks is not None:
            end = n_blocks
        else:
            raise InvalidSpan(f"{flag} {text!r}: an open end needs the model's block count")
    except ValueError as error:
        raise InvalidSpan(f"{flag} {text!r}: bounds must be integers, e.g. 4:8") from error
    if start < 0 or end <= start:
        raise InvalidSpan(f"{flag} {text!r}: need 0 <= START < END")
    if n_blocks is not None and end > n_blocks:
        raise InvalidSpan(f"{flag} {text!r}: the model has only {n_blocks} blocks (0..{n_blocks - 1})")
    return Span(start, end)

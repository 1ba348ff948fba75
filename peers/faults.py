"""Deterministic fault injection for tests: flags, and the hooks that kill this process.

Library code never ends its own process: components expose hooks (``InferenceServer``'s
``on_step(session_steps)``), and this module builds the hooks that die like a crash
(SIGKILL: no drain, no withdrawal, no cleanup), as torchft's tests inject failures
from outside the manager. ``FaultConfig``'s fields become flags of the daemons.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultConfig:
    """Failures a daemon injects into itself, for tests (all off by default)."""

    fail_at_step: int = field(
        default=0,
        metadata={
            "help": "testing: SIGKILL this process when a session gets its N-th step "
            "(replayed steps count; 0: never)"
        },
    )

    def __post_init__(self) -> None:
        if self.fail_at_step < 0:
            raise ValueError("--fail-at-step must not be negative")

    def server_step_hook(self) -> Callable[[int], None] | None:
        """The ``on_step`` hook for ``InferenceServer``, or None when no fault is set."""
        if not self.fail_at_step:
            return None

        def on_step(session_steps: int) -> None:
            if session_steps == self.fail_at_step:
                logger.warning("--fail-at-step %d reached: killing this process", session_steps)
                kill_this_process()

        return on_step


def kill_this_process() -> None:
    """Dies at once like a crashed peer: SIGKILL, which no handler can catch."""
    os.kill(os.getpid(), signal.SIGKILL)

"""Deterministic fault injection for tests: flags, and the hooks that kill this process.

Library code never ends its own process: components expose hooks (``InferenceServer``'s
``on_step(session_steps)``, the trainer's ``before_send(AllReduceSend)``), and this
module builds the hooks that die like a crash (SIGKILL: no drain, no withdrawal, no
cleanup), as torchft's tests inject failures from outside the manager.

- ``FaultConfig``: its fields become flags of `swarm join` (``--fail-at-step``, and
  ``--perturb-outputs`` with its ``--perturb-after-steps`` / ``--perturb-every-session``:
  a server that returns slightly wrong outputs, through ``InferenceServer``'s
  ``on_output`` hook, to test the clients' spot checks).
- ``AllReduceFault``: read from ``SWARM_FAULT=nth:kind[:min_members]`` (an environment
  variable, so a test or the demo can set it on one member of a run).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from swarm.training.averaging import AllReduceSend

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

    perturb_outputs: float = field(
        default=0.0,
        metadata={
            "help": "testing: add noise of this size relative to each output vector's norm to the "
            "session steps' outputs (a lying server; 0: honest)"
        },
    )
    perturb_after_steps: int = field(
        default=0,
        metadata={"help": "testing: with --perturb-outputs, honest for a session's first N steps"},
    )
    perturb_every_session: int = field(
        default=1,
        metadata={
            "help": "testing: with --perturb-outputs, perturb only every N-th inference session "
            "opened here (1: all; else the N-th, 2N-th, ...)"
        },
    )

    def __post_init__(self) -> None:
        if self.fail_at_step < 0:
            raise ValueError("--fail-at-step must not be negative")
        if self.perturb_outputs < 0 or self.perturb_after_steps < 0:
            raise ValueError("--perturb-outputs and --perturb-after-steps must not be negative")
        if self.perturb_every_session < 1:
            raise ValueError("--perturb-every-session must be at least 1")

    def server_output_hook(self) -> Callable[[bytes, int, torch.Tensor], torch.Tensor] | None:
        """The ``on_output`` hook for ``InferenceServer`` that lies, or None when honest.

        The noise is deterministic (seeded by the session's step count): each wrong output
        vector is off by ``perturb_outputs`` of its norm, in a random direction.
        """
        if not self.perturb_outputs:
            return None
        sessions: dict[bytes, int] = {}  # token -> ordinal of the session on this server

        def on_output(token: bytes, session_steps: int, output: torch.Tensor) -> torch.Tensor:
            ordinal = sessions.setdefault(token, len(sessions) + 1)
            if ordinal % self.perturb_every_session or session_steps <= self.perturb_after_steps:
                return output
            noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(session_steps))
            noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scale = self.perturb_outputs * output.float().norm(dim=-1, keepdim=True)
            return (output.float() + scale * noise).to(output.dtype)

        return on_output

    def server_step_hook(self) -> Callable[[int], None] | None:
        """The ``on_step`` hook for ``InferenceServer``, or None when no fault is set."""
        if not self.fail_at_step:
            return None

        def on_step(session_steps: int) -> None:
            if session_steps == self.fail_at_step:
                logger.warning("--fail-at-step %d reached: killing this process", session_steps)
                kill_this_process()

        return on_step


@dataclass(frozen=True)
class AllReduceFault:
    """Kill this process (SIGKILL) as it sends the all-reduce message ``kind`` in its
    ``nth`` all-reduce (counting from 1) among at least ``min_members`` members.

    Read from ``SWARM_FAULT=nth:kind[:min_members]``, e.g. ``2:result:3``; for tests and
    demos only. Counting this member's own all-reduces rather than naming a round makes
    the fault independent of when it joined the run.
    """

    nth: int
    kind: str
    min_members: int = 2

    @classmethod
    def from_environment(cls) -> AllReduceFault | None:
        value = os.environ.get("SWARM_FAULT", "")
        if not value:
            return None
        try:
            nth, kind, *rest = value.split(":")
            return cls(int(nth), kind, *(int(r) for r in rest[:1]))
        except ValueError:
            raise ValueError(
                f"SWARM_FAULT={value!r}: expected nth:kind[:min_members], e.g. 2:result:3"
            ) from None

    def before_send_hook(self) -> Callable[[AllReduceSend], None]:
        """The trainer's ``before_send`` hook that carries out this fault."""
        last_all_reduce, ordinal = 0, 0  # ordinal: among this member's all-reduces of min_members or more

        def before_send(send: AllReduceSend) -> None:
            nonlocal last_all_reduce, ordinal
            if send.group_size < self.min_members:
                return
            if send.all_reduce != last_all_reduce:
                last_all_reduce = send.all_reduce
                # A group of one sends nothing, so the hook never sees it: when such groups count
                # too (min_members <= 1), every all-reduce counts and the service's count is the ordinal.
                ordinal = send.all_reduce if self.min_members <= 1 else ordinal + 1
            if ordinal == self.nth and send.kind == self.kind:
                logger.warning(
                    "fault injection: killing this process in its all-reduce %s, sending a %s to member %d",
                    send.round_id,
                    send.kind,
                    send.target,
                )
                kill_this_process()

        return before_send


def kill_this_process() -> None:
    """Dies at once like a crashed peer: SIGKILL, which no handler can catch."""
    os.kill(os.getpid(), signal.SIGKILL)

"""Wire messages of the inference service (kinds ``serve.*``).

A client runs a prompt through a chain of servers, each holding a span of blocks:

* ``ForwardRequest`` -> ``ForwardReply``: one causal pass without a cache (prefill only).
* ``OpenInference`` opens a streaming session on a server (its cache lives there);
  each ``InferenceStep`` -> ``InferenceReply`` appends ``hidden`` at ``position``.
  A step may come without ``hidden``: its input then arrives as a ``PushHidden`` from
  the previous server of the chain (pipelining) or from the client (its own copy);
  the first copy for that step wins.
* ``StatsRequest`` -> ``ServerStats``: counters that show batching and pushes happen.

Tensors are (batch, new_tokens, hidden_size) and travel raw (exact) by default.
"""

from __future__ import annotations

from typing import NewType

import torch

from transport import Message, message

SessionToken = NewType("SessionToken", bytes)
"""Names one inference session on one server; chosen by the client, shared only with
the server that pushes into that session."""


@message("serve.forward")
class ForwardRequest(Message):
    """Run blocks ``[start, end)`` over ``hidden`` (batch, seq, hidden) from position 0."""

    start: int
    end: int
    hidden: torch.Tensor


@message("serve.forward_reply")
class ForwardReply(Message):
    hidden: torch.Tensor  # (batch, seq, hidden)


@message("serve.open")
class OpenInference(Message):
    """Opens a session of ``batch`` rows of up to ``max_length`` tokens on blocks ``[start, end)``."""

    token: SessionToken
    start: int
    end: int
    batch: int
    max_length: int
    config_hash: str = ""  # the client's model config hash; a server serving another refuses ("": unchecked)


@message("serve.step")
class InferenceStep(Message):
    """Append ``new_tokens`` tokens to every row, starting at cache position ``position``.

    Attributes:
        step: the client's step number (pushes are matched to it).
        position: the tokens every row holds before this step; a smaller value than
            the server holds truncates the cache first (replay, retry).
        new_tokens: tokens per row in this step.
        hidden: (batch, new_tokens, hidden) or None to wait for a ``PushHidden``.
        push_address, push_key, push_token: the next server of the chain, which gets
            this step's output straight away; empty when this is the last hop.
    """

    step: int
    position: int
    new_tokens: int
    hidden: torch.Tensor | None = None
    push_address: str = ""
    push_key: bytes = b""
    push_token: bytes = b""


@message("serve.step_reply")
class InferenceReply(Message):
    """The output of ``step``; ``hidden`` is None when its input never came (resend it).

    Attributes:
        input_source: where the input came from: "step", "push", "client-copy" or "missing".
    """

    step: int
    hidden: torch.Tensor | None  # (batch, new_tokens, hidden)
    input_source: str


@message("serve.push")
class PushHidden(Message):
    """The input of ``step`` for the session ``token`` (from a server, or the client's copy)."""

    token: SessionToken
    step: int
    hidden: torch.Tensor
    from_client: bool = False


@message("serve.push_ack")
class PushAck(Message):
    accepted: bool  # False: a copy of this step was already there (or the step passed)


@message("serve.stats")
class StatsRequest(Message):
    pass


@message("serve.stats_reply")
class ServerStats(Message):
    """Counters since the server started.

    Attributes:
        sessions: open inference sessions.
        cache_tokens_used, cache_tokens_total: the cache budget.
        forwards: forward passes over the cache (one per batch).
        batched_steps: steps that ran in a forward together with another session's.
        pushes_sent: step outputs pushed to the next server (acknowledged).
        pushes_used: steps whose input came from a server's push before any other copy.
        client_copies_used: steps whose input came from the client's copy first.
    """

    sessions: int
    cache_tokens_used: int
    cache_tokens_total: int
    forwards: int
    batched_steps: int
    pushes_sent: int
    pushes_used: int
    client_copies_used: int
    draining: bool

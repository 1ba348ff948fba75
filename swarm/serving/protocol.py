"""Wire messages of the inference service (kinds ``serve.*``).

A client runs a prompt through a chain of servers, each holding a span of blocks:

* ``ForwardRequest`` -> ``ForwardReply``: one causal pass without a cache (prefill only).
* ``OpenInference`` opens a streaming session on a server (its cache lives there);
  each ``InferenceStep`` -> ``InferenceReply`` appends ``hidden`` at ``position``.
  A step may come without ``hidden``: its input then arrives as a ``PushHidden`` from
  the previous server of the chain (pipelining) or from the client (its own copy);
  the first copy for that step wins.
* ``StatsRequest`` -> ``ServerStats``: counters that show batching and pushes happen.
* ``SpanForward`` / ``SpanBackward``: fine-tuning, stateless passes with the client's
  adapters (below).

Tensors are (batch, new_tokens, hidden_size) and travel raw (exact) by default; a session
opened with ``activations="bf16"`` or ``"int8"`` gets its replies and the pushes into the
next server in that format (the client sends its inputs in it too).
"""

from __future__ import annotations

from typing import NewType

import torch

from transport import Message, message
from transport.errors import ServerBusy

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
    adapter_hash: bytes = b""  # LoRA adapters (``PutAdapter``) applied to every step ("": none)
    activations: str = "float32"  # how the session's hidden states travel (``transport.WIRE_FORMATS``)


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
    """The answer to a ``PushHidden`` sent as a call; servers push one way and never wait for it."""

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
        pushes_sent: step outputs pushed to the next server (sent; pushes are not acknowledged).
        pushes_used: steps whose input came from a server's push before any other copy.
        client_copies_used: steps whose input came from the client's copy first.
        pushes_refused: pushes not sent because no server of the next block announces the
            address and key the client named.
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
    pushes_refused: int = 0


# Fine-tuning (``swarm/serving/training_server.py``): stateless passes over frozen blocks
# with the client's own LoRA adapters applied. Adapters of a span travel as wire names
# ``"<target>.A"`` (blocks, rank, in) / ``"<target>.B"`` (blocks, out, rank) (see
# ``kernels/lora.py``); the server keeps them by ``adapter_hash`` for a while, so a
# request may name the hash and leave ``adapters`` empty (``AdapterNotCached`` if it
# expired: resend them). Deep prompts (``kernels/deep_prompts.py``) travel with each request: per
# block of the span, vectors added to the first positions' hidden states before that block.


@message("serve.train_forward")
class SpanForward(Message):
    """Run blocks ``[start, end)`` over ``hidden`` (batch, seq, hidden) from position 0, with adapters.

    ``keep`` (a client-chosen token, empty for none) asks the server to keep this
    forward's activations for the backward that names the same token, when its token
    budget allows: the backward then need not recompute the forward. Kept activations
    expire unused after a while.
    """

    start: int
    end: int
    hidden: torch.Tensor
    adapter_hash: bytes = b""
    adapters: dict[str, torch.Tensor] | None = None
    lora_scaling: float = 1.0
    keep: bytes = b""
    prompts: torch.Tensor | None = None  # deep prompts (blocks, virtual, hidden), added before each block


@message("serve.train_forward_reply")
class SpanForwardReply(Message):
    hidden: torch.Tensor  # (batch, seq, hidden)


@message("serve.backward")
class SpanBackward(Message):
    """Gradients of the span's inputs and adapters, given its inputs and the gradient of its outputs.

    The server recomputes the forward of ``hidden`` with autograd on its frozen weights.
    """

    start: int
    end: int
    hidden: torch.Tensor  # (batch, seq, hidden): the span's input
    grad_output: torch.Tensor  # (batch, seq, hidden): d loss / d span output
    adapter_hash: bytes = b""
    adapters: dict[str, torch.Tensor] | None = None
    lora_scaling: float = 1.0
    kept: bytes = b""  # the ``keep`` token of this input's forward on this server (used if still kept)
    prompts: torch.Tensor | None = None  # deep prompts (blocks, virtual, hidden), as in its forward


@message("serve.backward_reply")
class SpanBackwardReply(Message):
    grad_hidden: torch.Tensor  # (batch, seq, hidden)
    grad_adapters: dict[str, torch.Tensor]  # by wire name; empty without adapters
    reused_forward: bool = False  # the kept activations of the forward were used (no recomputation)
    grad_prompts: torch.Tensor | None = None  # (blocks, virtual, hidden) when the request had prompts


@message("serve.put_adapter")
class PutAdapter(Message):
    """Keeps LoRA adapters of blocks ``[start, end)`` on the server, for sessions opened with their hash."""

    start: int
    end: int
    adapters: dict[str, torch.Tensor]
    lora_scaling: float = 1.0


@message("serve.put_adapter_reply")
class PutAdapterReply(Message):
    adapter_hash: bytes


class AdapterNotCached(ServerBusy):
    """The request named an adapter hash this server does not hold (expired, or a new
    server after failover): send the same request again with ``adapters`` filled in."""

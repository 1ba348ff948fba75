"""Generation with a fine-tuned adapter: LoRA in the servers' sessions, a soft prompt before the input.

``SessionLora`` is what an ``InferenceSession`` opened with LoRA adapters carries: each
hop's ``OpenInference`` names the content hash of its span's adapters and the server
applies them to every step of that session (``swarm/serving/steps.py``, batched with
other sessions of the same adapter). A server that does not hold them answers
``AdapterNotCached``; the client uploads them (``PutAdapter``) and opens again. A
replacement after a failure is opened the same way, so the failover replay runs with
the adapter too.

``PromptedSession`` wraps a session so that its first step carries a soft prompt's
vectors before the input embeddings (prompt tuning needs nothing of the servers).
``resolve_adapter`` reads what ``RemoteModel.generate(adapter=...)`` accepts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kernels.lora import LoraAdapters, adapter_hash
from kernels.prompt_tuning import SoftPrompt
from swarm.serving.protocol import OpenInference, PutAdapter
from transport import ClientStream, Connection
from transport.errors import RemoteError


class SessionLora:
    """A frozen copy of LoRA adapters for generation sessions, sliced and hashed per span.

    Args:
        adapters: the adapters (copied: training them further does not change this session's).
    """

    def __init__(self, adapters: LoraAdapters):
        self.scaling = adapters.lora.scaling
        n_blocks = adapters.model_config.num_layers
        self._tensors = {name: t.detach().clone() for name, t in adapters.span_tensors(0, n_blocks).items()}
        self._spans: dict[tuple[int, int], tuple[dict[str, torch.Tensor], bytes]] = {}
        self.uploads = 0  # PutAdapter calls made (a server that did not hold the adapter)

    def span(self, start: int, end: int) -> tuple[dict[str, torch.Tensor], bytes]:
        """The adapters of blocks ``[start, end)`` and their content hash."""
        if (start, end) not in self._spans:
            tensors = {name: t[start:end].contiguous() for name, t in self._tensors.items()}
            self._spans[(start, end)] = (tensors, adapter_hash(tensors, self.scaling))
        return self._spans[(start, end)]

    async def open_stream(
        self, connection: Connection, opening: OpenInference, timeout: float
    ) -> ClientStream:
        """Opens the session with the span's adapter hash, uploading the adapters if the server lacks them.

        Raises:
            the errors of ``Connection.open_stream`` and ``Connection.call``.
        """
        tensors, key = self.span(opening.start, opening.end)
        opening = dataclasses.replace(opening, adapter_hash=key)
        try:
            return await connection.open_stream(opening, timeout=timeout)
        except RemoteError as error:
            if error.kind != "AdapterNotCached":
                raise
        upload = PutAdapter(start=opening.start, end=opening.end, adapters=tensors, lora_scaling=self.scaling)
        await connection.call(upload, timeout=timeout)
        self.uploads += 1
        return await connection.open_stream(opening, timeout=timeout)


class PromptedSession:
    """An ``InferenceSession`` whose first step gets the soft prompt's vectors before its input.

    Everything else is the wrapped session's (``route``, ``failovers``, ``close``...); its
    ``max_length`` must leave room for the prompt's ``num_virtual_tokens``.
    """

    def __init__(self, session, prompt: SoftPrompt):
        self.session, self.prompt = session, prompt

    async def __aenter__(self) -> PromptedSession:
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.__aexit__(*exc_info)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Like ``InferenceSession.step``; the first step's output includes the prompt's positions."""
        if self.session.position == 0:
            with torch.no_grad():
                hidden = self.prompt.prepend(hidden)
        return await self.session.step(hidden)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def resolve_adapter(model_config, adapter) -> tuple[LoraAdapters | None, SoftPrompt | None]:
    """``adapter`` as (LoRA, soft prompt): a PEFT folder (LoRA or prompt tuning), ``LoraAdapters``,
    ``SoftPrompt``, or a (LoRA, prompt) pair (either may be None).

    Raises:
        ValueError: anything else, or an adapter for another model.
    """
    if adapter is None:
        return None, None
    if isinstance(adapter, (str, Path)):
        from swarm.serving.finetune_run import load_adapter

        return load_adapter(model_config, adapter)
    if isinstance(adapter, LoraAdapters):
        return adapter, None
    if isinstance(adapter, SoftPrompt):
        return None, adapter
    if isinstance(adapter, tuple) and len(adapter) == 2:
        lora, prompt = adapter
        if (lora is None or isinstance(lora, LoraAdapters)) and (
            prompt is None or isinstance(prompt, SoftPrompt)
        ):
            return lora, prompt
    raise ValueError(
        "adapter must be a PEFT folder, LoraAdapters, a SoftPrompt or a (LoraAdapters, SoftPrompt) pair, "
        f"got {type(adapter).__name__}"
    )

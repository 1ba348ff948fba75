"""``RemoteModel``: generate text with a model whose blocks are served by the swarm.

The client holds the small pieces (tokenizer, embeddings, final norm, LM head) and
sends hidden states through a chain of servers found in the DHT::

    async with RemoteModel.connect("llama-dir", initial_peers=[maddr]) as model:
        text = await model.generate("Once upon a time", max_new_tokens=32)
        async for piece in model.stream("Hello", max_new_tokens=16, sampling=Sampling(temperature=0.8)):
            print(piece, end="")
        async with model.inference_session(max_length=512) as session:   # multi-turn
            first = await model.generate("Hi!", session=session)
            second = await model.generate(" And then?", session=session)
        answer = await model.chat([{"role": "user", "content": "Hi!"}])  # the model's chat template

For scripts and notebooks, :func:`swarm.serving.connect_sync` gives the same methods, blocking.

``model = await RemoteModel.connect(...)`` works too (then ``await model.close()``).
Servers are listed, banned and connected to through ``model.servers``, a ``ServerPool``
that the model's sessions share.

Errors (``transport.errors`` tree, never an ``ExceptionGroup``): ``NoRouteError``
(names the uncovered blocks) when a span stays uncovered past ``ClientConfig.route_wait``;
``RemoteError`` for a request a server refused as malformed; a ``RetryableError`` when
every replacement for a failed span failed too; ``ValueError`` for bad arguments.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator, Coroutine, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kernels import (
    LocalModel,
    MissingTokenizerError,
    TextTokenizer,
    load_client_pieces,
    load_config,
    load_tokenizer,
    render_chat,
)
from kernels.model_config import config_fingerprint, config_hash, describe_config_difference
from kernels.tokenizer import read_eos_token_ids, read_sampling_defaults
from swarm import BanList, DHTConfig, Identity, ModelMismatch, ServerRecord, SwarmDHT
from swarm.serving.drafting import SpeculativeConfig, load_draft_model, make_drafter
from swarm.serving.generation import Sampling, generate_rows
from swarm.serving.remote_training import RemoteTraining
from swarm.serving.server_pool import ServerPool
from swarm.serving.session import InferenceSession
from swarm.serving.session_adapters import PromptedSession, SessionLora, resolve_adapter
from swarm.serving.settings import ClientConfig
from swarm.serving.speculative import generate_speculative
from swarm.serving.step_failures import first_documented_error
from swarm.serving.verified_generation import generate_verified
from transport import Connection, Endpoint, Timeouts
from transport.errors import SwarmError

logger = logging.getLogger(__name__)


class RemoteModel:
    """A model served by the swarm; create with :meth:`connect`, close with :meth:`close`.

    Attributes:
        model_config: the checkpoint's ``ModelConfig``.
        tokenizer: the checkpoint's ``kernels.TextTokenizer`` (None when it has none).
        eos_token_ids: every id that ends generation (generation_config.json, config.json, tokenizer).
        missing_tokenizer: why ``tokenizer`` is None (a MissingTokenizerError), else None.
        sampling_defaults: the sampling fields the checkpoint sets (see ``default_sampling``).
        default_sampling: the ``Sampling`` the checkpoint recommends (``generation_config.json``
            with ``do_sample``, or a GGUF's ``general.sampling.*``); greedy when it says none.
            ``swarm generate`` and ``swarm api`` use it for what a user leaves unset;
            ``generate`` / ``stream`` stay greedy unless given ``sampling=``.
        servers: the ``ServerPool`` (listing, bans, connections) the sessions share.
        speculative_config: how speculative decoding drafts (``generate(speculative=...)``).
    """

    def __init__(self, checkpoint_dir: str | Path, dht: SwarmDHT, endpoint: Endpoint, config: ClientConfig):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model_config = load_config(checkpoint_dir)
        self.config_hash = config_hash(self.model_config)
        self.pieces = load_client_pieces(checkpoint_dir, config=self.model_config).eval()
        try:
            self.tokenizer: TextTokenizer | None = load_tokenizer(checkpoint_dir)
            self.missing_tokenizer: MissingTokenizerError | None = None
        except MissingTokenizerError as error:
            self.tokenizer, self.missing_tokenizer = None, error
        eos = self.tokenizer.eos_token_ids if self.tokenizer else read_eos_token_ids(checkpoint_dir)
        configured = () if self.model_config.eos_token_id is None else (self.model_config.eos_token_id,)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys((*eos, *configured)))
        self.sampling_defaults = {name: value for name, value in read_sampling_defaults(checkpoint_dir).items()
                                  if not (name == "top_k" and value == 0)}  # top_k 0 means off  # fmt: skip
        self.default_sampling = Sampling(**self.sampling_defaults)
        self.dht = dht
        self.endpoint = endpoint
        self.config = config
        self.speculative_config = SpeculativeConfig()
        self._drafts: dict[Path, LocalModel] = {}  # draft models by folder, loaded once
        self.loop: asyncio.AbstractEventLoop | None = None  # set by connect()
        bans = BanList(base_seconds=config.ban_seconds)
        self.servers = ServerPool(
            dht, endpoint, self.model_config.num_layers, bans, config.dht_timeout,
            deadline_floor=config.step_deadline_floor, deadline_factor=config.step_deadline_factor,
            deadline_ceiling=config.step_timeout, config_hash=self.config_hash,
            refresh_period=config.route_refresh,
        )  # fmt: skip

    @classmethod
    def connect(
        cls,
        checkpoint_dir: str | Path,
        initial_peers: Sequence[str],
        *,
        swarm: str = "swarm",
        swarm_key: bytes | None = None,
        config: ClientConfig | None = None,
    ) -> _Connecting:
        """Joins the swarm's DHT as a client and loads the local pieces of the model.

        Use as ``async with RemoteModel.connect(...) as model:`` (closed on exit), or
        ``model = await RemoteModel.connect(...)`` (then close it yourself).

        Args:
            checkpoint_dir: the checkpoint (config, tokenizer, embeddings and head are read).
            initial_peers: multiaddrs of swarm members.
            swarm: the swarm's name.
            swarm_key: a private swarm's shared key.
            config: deadlines and failover policy.
        Raises:
            DHTStartError: the DHT could not reach the swarm.
        """
        return _Connecting(cls._connect(checkpoint_dir, initial_peers, swarm, swarm_key, config))

    @classmethod
    async def _connect(cls, checkpoint_dir, initial_peers, swarm, swarm_key, config) -> RemoteModel:
        dht_config = DHTConfig(swarm_name=swarm, initial_peers=tuple(initial_peers), client_mode=True)
        dht = SwarmDHT(Identity.generate(), dht_config, swarm_key)
        await asyncio.to_thread(dht.start)
        config = config or ClientConfig()
        endpoint = Endpoint(swarm_key=swarm_key, timeouts=Timeouts(connect=config.connect_timeout))
        try:
            model = await asyncio.to_thread(cls, checkpoint_dir, dht, endpoint, config)
            # What is alive now (torch, hivemind, the model's pieces: millions of objects) is left
            # out of the collector's full scans: one took ~0.4 s on a 2-core VM and stalled a
            # token in the middle of a generation (issue #18).
            gc.freeze()
            await model._check_model_record()
            await model.servers.start()  # the live view: its first lookup overlaps what the caller does next
            model.loop = asyncio.get_running_loop()  # where its connections live (see forward)
            return model
        except BaseException:
            await endpoint.close()
            await asyncio.to_thread(dht.shutdown)
            raise

    async def _check_model_record(self) -> None:
        """Refuses a swarm whose model record has another config hash, naming what differs.

        (Each server also refuses a session whose hash differs from its own.)"""
        try:
            record = await self.dht.get_model(timeout=self.config.dht_timeout)
        except SwarmError as error:  # the servers check each session anyway
            logger.debug("could not read the swarm's model record: %s", error)
            return
        if record is None or record.config_hash == self.config_hash:
            return
        if record.config_fields:
            difference = describe_config_difference(
                config_fingerprint(self.model_config), dict(record.config_fields)
            )
        else:
            difference = f"config hash {self.config_hash} here, {record.config_hash} there"
        raise ModelMismatch(f"the swarm serves {record.model_id!r}, whose config differs from "
                            f"{self.checkpoint_dir}'s: {difference}")  # fmt: skip

    async def close(self) -> None:
        """Closes connections and leaves the DHT. Idempotent."""
        await self.servers.close()
        await self.endpoint.close()
        await asyncio.to_thread(self.dht.shutdown)

    async def __aenter__(self) -> RemoteModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def bans(self) -> BanList:
        """Servers this client avoids for a while after they failed (``servers.bans``)."""
        return self.servers.bans

    async def list_servers(self) -> dict[str, ServerRecord]:
        """The servers the DHT lists for this model's blocks (``servers.list()``)."""
        return await self.servers.list()

    async def connection_to(self, server: ServerRecord) -> Connection:
        """A (cached) connection to ``server`` (``servers.connection_to()``)."""
        return await self.servers.connection_to(server)

    def inference_session(self, max_length: int, batch: int = 1, adapter=None) -> InferenceSession:
        """A session whose server caches persist between :meth:`generate` calls (multi-turn).

        ``adapter``: a fine-tuned adapter every step uses (see ``generate``); a soft prompt's
        tokens come on top of ``max_length``.
        """
        lora, prompt = resolve_adapter(self.model_config, adapter)
        virtual = 0 if prompt is None else prompt.num_virtual_tokens
        session = InferenceSession(self.servers, self.config, max_length + virtual, batch,
                                   None if lora is None else SessionLora(lora))  # fmt: skip
        return session if prompt is None else PromptedSession(session, prompt)

    def forward(self, input_ids: torch.Tensor, *, adapters=None, prompts=None) -> torch.Tensor:
        """Logits (batch, seq, vocab) with autograd through the swarm to ``adapters`` (``LoraAdapters``)
        and ``prompts`` (``SoftPrompt``); blocks the calling thread, which must not be the model's
        loop (``swarm/serving/remote_training.py``)."""
        return self.training.forward(input_ids, adapters, prompts)

    @functools.cached_property
    def training(self) -> RemoteTraining:
        """Fine-tuning through the swarm (stateless forward/backward with failover)."""
        return RemoteTraining(self, self.loop)

    def encode(self, text: str) -> torch.Tensor:
        """text -> ids (1, tokens). Raises MissingTokenizerError (a ValueError) without a tokenizer."""
        return torch.tensor([self._text().encode(text)], dtype=torch.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._text().decode(list(ids))

    def _text(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise MissingTokenizerError(f"{self.missing_tokenizer} (from Python, token ids work without one)")
        return self.tokenizer

    async def generate(
        self,
        prompt: str | list[str] | torch.Tensor,
        max_new_tokens: int = 32,
        *,
        sampling: Sampling | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        session: InferenceSession | None = None,
        adapter=None,
        speculative: str | None = None,
        draft_model: str | Path | None = None,
    ) -> str | list[str] | torch.Tensor:
        """Generates a continuation.

        Args:
            prompt: text, several texts (run as concurrent sessions), or ids (batch, tokens).
            max_new_tokens: tokens to add at most.
            sampling: how tokens are picked; or give its fields as keywords (``temperature``,
                ``top_k``, ``top_p``, ``repetition_penalty``, ``stop``, ``seed``: see ``Sampling``).
            session: continue in this open session (multi-turn); a fresh one when None.
            adapter: a fine-tuned adapter: a PEFT folder (LoRA or soft prompt, e.g. from
                `swarm finetune`), ``LoraAdapters``, a ``SoftPrompt`` or a pair of them; the
                servers apply LoRA in the session's cached steps (a session of your own takes
                it at ``inference_session(..., adapter=)``).
            speculative: "lookup" (prompt lookup drafts) or "draft" (``draft_model`` drafts):
                the servers verify several drafted tokens per pass (``swarm/serving/speculative.py``);
                greedy output is unchanged, sampled output keeps its distribution. None: off.
            draft_model: with ``speculative="draft"``, a small checkpoint with the same tokenizer.
        Returns:
            the new text (or list of texts); for ids, the prompt plus the new ids (batch, tokens).
        Raises:
            NoRouteError, RemoteError, ValueError: see the module docstring.
        """
        sampling = _sampling(sampling, temperature, top_k, top_p, repetition_penalty, stop, seed)
        if isinstance(prompt, list):
            if session is not None:
                raise ValueError(
                    "a list of prompts runs in sessions of its own; pass one prompt with session="
                )
            try:
                options = {"sampling": sampling, "speculative": speculative, "draft_model": draft_model}
                async with asyncio.TaskGroup() as tasks:
                    runs = [
                        tasks.create_task(self.generate(p, max_new_tokens, adapter=adapter, **options))
                        for p in prompt
                    ]
            except BaseExceptionGroup as group:  # the documented error, not a group of them
                raise first_documented_error(group) from None
            return [run.result() for run in runs]
        run = self._run(prompt, max_new_tokens, session, sampling, adapter=adapter,
                        speculation=(speculative, draft_model))  # fmt: skip
        pieces = [piece async for piece in run]
        if isinstance(prompt, torch.Tensor):
            return torch.cat([prompt.to(torch.int64), *pieces], dim=1) if pieces else prompt
        return "".join(pieces)

    def stream(
        self,
        prompt: str | torch.Tensor,
        max_new_tokens: int = 32,
        *,
        sampling: Sampling | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        session: InferenceSession | None = None,
        adapter=None,
        speculative: str | None = None,
        draft_model: str | Path | None = None,
    ) -> AsyncIterator[str | torch.Tensor]:
        """Like :meth:`generate`, yielding as tokens are made: text pieces for a text prompt,
        (batch, 1) ids for an ids prompt."""
        sampling = _sampling(sampling, temperature, top_k, top_p, repetition_penalty, stop, seed)
        return self._run(prompt, max_new_tokens, session, sampling, adapter=adapter,
                         speculation=(speculative, draft_model))  # fmt: skip

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """``messages`` rendered with the checkpoint's chat template, the assistant's turn
        opened, as ids (1, tokens). Raises ChatTemplateError when the checkpoint has no template."""
        text = self._text()
        rendered = render_chat(text.chat_template, messages, add_generation_prompt=True, bos_token=text.bos_token,
                               eos_token=text.eos_token, source=text.source)  # fmt: skip
        return torch.tensor([text.encode(rendered, add_special_tokens=False)], dtype=torch.int64)

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 256,
        *,
        sampling: Sampling | None = None,
    ) -> str:
        """The assistant's answer to ``messages`` (``[{"role": "user", "content": "Hi"}, ...]``),
        with the checkpoint's own chat template; it ends at the model's end-of-turn token."""
        return "".join(
            [piece async for piece in self.stream_chat(messages, max_new_tokens, sampling=sampling)]
        )

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 256,
        *,
        sampling: Sampling | None = None,
        adapter=None,
        speculative: str | None = None,
        draft_model: str | Path | None = None,
    ) -> AsyncIterator[str]:
        """Like :meth:`chat`, yielding text pieces as they are made (``adapter``, ``speculative``: as
        in :meth:`generate`)."""
        return self._run(self.chat_prompt(messages), max_new_tokens, None, sampling or Sampling(), as_text=True,
                         adapter=adapter, speculation=(speculative, draft_model))  # fmt: skip

    async def _run(self, prompt, max_new_tokens: int, session: InferenceSession | None, sampling: Sampling,
                   as_text: bool = False, adapter=None, speculation: tuple = (None, None)):  # fmt: skip
        if session is not None and adapter is not None:
            raise ValueError("an open session has its adapter already: pass adapter= to inference_session()")
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt.to(torch.int64)
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        decode = self.decode if as_text or isinstance(prompt, str) else None
        loop = functools.partial(self._token_loop, ids, max_new_tokens, decode, speculation)
        if session is None and self.config.verify_fraction:
            # spot checks on: output shown once checked, rerun without a caught liar
            async for piece in generate_verified(
                lambda: self.inference_session(ids.shape[1] + max_new_tokens, ids.shape[0], adapter),
                lambda own, chosen: loop(chosen, own),
                sampling,
                self.config.replay_attempts + 1,
            ):
                yield piece
        elif session is None:
            async with self.inference_session(ids.shape[1] + max_new_tokens, ids.shape[0], adapter) as own:
                async for piece in loop(sampling, own):
                    yield piece
        else:
            async for piece in loop(sampling, session):
                yield piece

    def _token_loop(self, ids, max_new_tokens, decode, speculation, sampling, session) -> AsyncIterator:
        kind, draft_dir = speculation
        if kind is None:
            return generate_rows(
                self.pieces, session, ids, max_new_tokens, sampling, decode, self.eos_token_ids
            )
        if kind == "draft" and draft_dir is not None and (draft_dir := Path(draft_dir)) not in self._drafts:
            self._drafts[draft_dir] = load_draft_model(draft_dir, self.model_config.vocab_size)
        drafter = make_drafter(kind, self._drafts.get(draft_dir), self.speculative_config)
        return generate_speculative(self.pieces, session, ids, max_new_tokens, sampling, decode,
                                    self.eos_token_ids, drafter, self.speculative_config)  # fmt: skip


class _Connecting:
    """What :meth:`RemoteModel.connect` returns: awaitable, and an async context manager
    that closes the model on exit (httpx's shape)."""

    def __init__(self, opening: Coroutine[Any, Any, RemoteModel]):
        self._opening = opening
        self._model: RemoteModel | None = None

    def __await__(self) -> Generator[Any, None, RemoteModel]:
        return self._opening.__await__()

    async def __aenter__(self) -> RemoteModel:
        self._model = await self._opening
        return self._model

    async def __aexit__(self, *exc_info: object) -> None:
        await self._model.close()


def _sampling(
    sampling: Sampling | None, temperature, top_k, top_p, repetition_penalty, stop, seed
) -> Sampling:
    """``sampling``, or one built from the keywords; both at once is an error."""
    from_keywords = Sampling(temperature, top_k, top_p, repetition_penalty, tuple(stop), seed)
    if sampling is None:
        return from_keywords
    if from_keywords != Sampling():
        raise ValueError("pass either sampling= or the sampling keywords, not both")
    return sampling

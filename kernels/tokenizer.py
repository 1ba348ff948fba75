"""A checkpoint's text side: tokenizer, special tokens, chat template and the ids that end generation.

:func:`load_tokenizer` reads it from either kind of checkpoint:

- a directory: ``tokenizer.json``; ``tokenizer_config.json`` (``bos_token``,
  ``eos_token``, ``chat_template``), or ``chat_template.jinja``; the end-of-sequence
  ids of ``generation_config.json`` and ``config.json`` (each may list several:
  Llama 3 Instruct ends a turn with ``<|eot_id|>`` as well as ``<|end_of_text|>``);
- a ``.gguf`` file: the tokenizer built from its metadata (:mod:`kernels.gguf_tokenizer`),
  ``tokenizer.chat_template`` and the eos / eot / eom ids.

Every id in :attr:`TextTokenizer.eos_token_ids` ends generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.gguf import is_gguf


class MissingTokenizerError(ValueError):
    """The checkpoint has no tokenizer (fatal for text prompts; token ids still work)."""


@dataclass(frozen=True)
class TextTokenizer:
    """Text <-> ids for one checkpoint.

    Attributes:
        backend: the ``tokenizers.Tokenizer``.
        bos_token, eos_token: their text (None when the checkpoint names none).
        eos_token_ids: every id that ends generation.
        chat_template: the Jinja chat template (None when the checkpoint has none).
        source: where it was read from (for messages).
    """

    backend: Any
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    source: str

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text -> ids; ``add_special_tokens`` lets the tokenizer add its BOS (a rendered chat
        template writes its own, so chat prompts are encoded without)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _token_text(value: Any) -> str | None:
    """``tokenizer_config.json`` spells a token as a string or as ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _chat_template(tokenizer_config: dict[str, Any], directory: Path) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        by_name = {entry.get("name"): entry.get("template") for entry in template}
        template = by_name.get("default")
    if template is None and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def read_eos_token_ids(checkpoint: str | Path) -> tuple[int, ...]:
    """Every end-of-sequence id the checkpoint declares (generation_config.json first)."""
    if is_gguf(checkpoint):
        from kernels.gguf_tokenizer import gguf_tokenizer_metadata

        metadata = gguf_tokenizer_metadata(checkpoint)
        found = [metadata.get(key) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return tuple(dict.fromkeys(int(i) for i in found if i is not None))
    directory = Path(checkpoint)
    generation = _read_json(directory / "generation_config.json")
    config = _read_json(directory / "config.json")
    found = _ids(generation.get("eos_token_id")) + _ids(config.get("eos_token_id"))
    return tuple(dict.fromkeys(found))


def read_sampling_defaults(checkpoint: str | Path) -> dict[str, Any]:
    """The sampling the checkpoint recommends, as ``temperature`` / ``top_k`` / ``top_p`` /
    ``repetition_penalty`` (only those it sets): ``generation_config.json`` (its values
    count only with ``do_sample: true``, except the repetition penalty, as in
    transformers), or a GGUF's ``general.sampling.*``. Empty: greedy."""
    if is_gguf(checkpoint):
        from kernels.gguf import open_gguf, read_field

        reader = open_gguf(checkpoint)
        keys = {
            "temperature": "temp",
            "top_k": "top_k",
            "top_p": "top_p",
            "repetition_penalty": "penalty_repeat",
        }
        found = {name: read_field(reader, f"general.sampling.{key}") for name, key in keys.items()}
        return {name: value for name, value in found.items() if value is not None}
    generation = _read_json(Path(checkpoint) / "generation_config.json")
    names = ("temperature", "top_k", "top_p") if generation.get("do_sample") else ()
    found = {name: generation.get(name) for name in (*names, "repetition_penalty")}
    return {name: value for name, value in found.items() if value is not None}


def load_tokenizer(checkpoint: str | Path) -> TextTokenizer:
    """The checkpoint's tokenizer; raises MissingTokenizerError naming what is missing."""
    if is_gguf(checkpoint):
        from kernels.gguf_tokenizer import build_gguf_tokenizer, gguf_tokenizer_metadata

        metadata = gguf_tokenizer_metadata(checkpoint)
        if not metadata.get("tokens"):
            raise MissingTokenizerError(f"{checkpoint} has no tokenizer metadata (tokenizer.ggml.tokens)")
        tokens = metadata["tokens"]

        def text(key: str) -> str | None:
            index = metadata.get(key)
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        return TextTokenizer(
            backend=build_gguf_tokenizer(metadata),
            bos_token=text("bos_token_id"),
            eos_token=text("eos_token_id"),
            eos_token_ids=read_eos_token_ids(checkpoint),
            chat_template=metadata.get("chat_template"),
            source=str(checkpoint),
        )
    directory = Path(checkpoint)
    path = directory / "tokenizer.json"
    if not path.exists():
        raise MissingTokenizerError(
            f"{directory} has no tokenizer.json: copy the model's tokenizer.json into it "
            "(or use the model's .gguf file, which carries its tokenizer)"
        )
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(path))
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    eos_token = _token_text(tokenizer_config.get("eos_token"))
    eos_ids = list(read_eos_token_ids(directory))
    if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
        eos_ids.append(eos_id)
    return TextTokenizer(
        backend=backend,
        bos_token=_token_text(tokenizer_config.get("bos_token")),
        eos_token=eos_token,
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        chat_template=_chat_template(tokenizer_config, directory),
        source=str(directory),
    )

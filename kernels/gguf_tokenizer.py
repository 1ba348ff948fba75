"""Build a ``tokenizers.Tokenizer`` from a GGUF file's own metadata (``tokenizer.ggml.*``).

A GGUF has no ``tokenizer.json``: it stores the vocabulary, merges, token types and
special ids under llama.cpp's keys. We build the same tokenizer ``transformers`` builds
from them (``integrations/gguf/gguf_tokenizer_mapping.py``), with the ``tokenizers``
package only:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (GPT-2's ``ByteLevel``
  pre-tokenizer, or the split regex of the vocabulary family ``tokenizer.ggml.pre`` names);
- ``"llama"``: SentencePiece-style BPE with byte fallback (``Metaspace``), merges
  recovered from the token scores when the file lists none.

Tokens the file marks CONTROL (type 3) become special tokens, USER_DEFINED (type 4)
plain added tokens, so ``<|im_start|>`` in a rendered chat template is one token.
"""

from __future__ import annotations

from typing import Any

from kernels.gguf import open_gguf, read_field

_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of the byte-level vocabularies whose merges were not learned on GPT-2's split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells tokens in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def gguf_tokenizer_metadata(path) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` values of a GGUF file."""
    reader = open_gguf(path)
    keys = ("model", "pre", "tokens", "token_type", "merges", "scores", "bos_token_id", "eos_token_id",
            "eot_token_id", "eom_token_id", "add_bos_token", "add_space_prefix")  # fmt: skip
    metadata = {key: read_field(reader, f"tokenizer.ggml.{key}") for key in keys}
    metadata["chat_template"] = read_field(reader, "tokenizer.chat_template")
    return metadata


def build_gguf_tokenizer(metadata: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` for ``metadata`` (from :func:`gguf_tokenizer_metadata`).

    Raises:
        ValueError: the file states a tokenizer model we do not build.
    """
    kind = metadata.get("model")
    if not metadata.get("tokens"):
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens")
    if kind == "gpt2":
        tokenizer = _byte_level(metadata)
    elif kind == "llama":
        tokenizer = _sentencepiece(metadata)
    else:
        raise ValueError(
            f"cannot build a tokenizer from GGUF tokenizer model {kind!r} (supported: gpt2, llama)"
        )
    _add_special_tokens(tokenizer, metadata, byte_level=kind == "gpt2")
    bos = metadata.get("bos_token_id")
    add_bos = metadata.get("add_bos_token")
    if add_bos is None:
        add_bos = kind == "llama"  # llama.cpp adds BOS to a SentencePiece vocabulary unless told not to
    if add_bos and bos is not None:
        from tokenizers.processors import TemplateProcessing

        token = metadata["tokens"][bos]
        tokenizer.post_processor = TemplateProcessing(
            single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, bos)]
        )
    return tokenizer


def _byte_level(metadata: dict[str, Any]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(metadata["tokens"])
    }
    merges = [tuple(merge.split(" ")) for merge in metadata.get("merges") or ()]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))  # fmt: skip
    split = _PRE_TOKENIZER_SPLITS.get(metadata.get("pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(metadata: dict[str, Any]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = metadata["tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if metadata.get("merges"):
        merges = [tuple(merge.split(" ")) for merge in metadata["merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, metadata.get("scores") or (), strict=False)))
    unknown = next(
        (t for t, kind in zip(tokens, metadata.get("token_type") or (), strict=False) if kind == 2), None
    )
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unknown, fuse_unk=True,
                                     byte_fallback=True, dropout=None))  # fmt: skip
    prefix = metadata.get("add_space_prefix")
    prefix = True if prefix is None else bool(prefix)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by the vocabulary: every split of a token into two
    tokens, best score first (as transformers' ``generate_merges``)."""
    merges = []
    for merged, score in scores.items():
        local = [(merged[:i], merged[i:], score) for i in range(1, len(merged))
                 if merged[:i] in vocab and merged[i:] in vocab]  # fmt: skip
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(tokenizer, metadata: dict[str, Any], byte_level: bool) -> None:
    from tokenizers import AddedToken

    tokens, types = metadata["tokens"], metadata.get("token_type") or ()
    spelled = set(bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(token, normalized=False, special=True)
               for token, kind in zip(tokens, types, strict=False)
               if kind == _CONTROL and (spelled is None or set(token) <= spelled)]  # fmt: skip
    if control:
        tokenizer.add_special_tokens(control)
    user = [AddedToken(token, normalized=False, special=False)
            for token, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED]  # fmt: skip
    if user:
        tokenizer.add_tokens(user)

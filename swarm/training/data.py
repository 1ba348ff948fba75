"""Training data: text files tokenized with the checkpoint's tokenizer, sampled per peer.

With no data directory the corpus is the Python standard library's own source files
(real text, on every machine). The token stream is cut into fixed-length windows;
each peer walks its own seeded permutation of the windows, so peers see different
data at any moment, and the position in that walk is part of the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".html", ".c", ".h")


def default_corpus_dir() -> Path:
    """The standard library's source directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_text_files(root: Path) -> list[Path]:
    """Text files under ``root`` in a fixed order (sorted relative paths); skips tests and site-packages."""
    if not root.is_dir():
        raise ValueError(f"--data: {root} is not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests")
        )
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(TEXT_SUFFIXES))
    if not files:
        raise ValueError(f"--data: no text files ({', '.join(TEXT_SUFFIXES)}) under {root}")
    return files


def tokenize_corpus(
    files: list[Path], tokenizer_path: Path, max_bytes: int, cache_dir: Path | None = None
) -> np.ndarray:
    """Concatenated token ids (int32) of the files, read in order until ``max_bytes`` of text.

    The result is cached under ``cache_dir`` keyed by the file list, sizes, tokenizer and budget.
    """
    tokenizer_bytes = Path(tokenizer_path).read_bytes()
    key = hashlib.sha256(tokenizer_bytes + str(max_bytes).encode())
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes and chosen:
            continue
        chosen.append(path)
        total += size
        key.update(f"{path}:{size}".encode())
        if total >= max_bytes:
            break
    cache_file = None if cache_dir is None else Path(cache_dir) / f"tokens-{key.hexdigest()[:16]}.npy"
    if cache_file is not None and cache_file.exists():
        return np.load(cache_file)
    tokenizer = Tokenizer.from_str(tokenizer_bytes.decode())
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in chosen]
    encodings = tokenizer.encode_batch(texts)
    tokens = np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.partial.npy")  # concurrent peers share the cache
        np.save(partial, tokens)
        os.replace(partial, cache_file)
    return tokens


def load_corpus(data_dir: str, tokenizer_path: Path, max_bytes: int, checkpoint_dir: str = "") -> np.ndarray:
    """A member's token stream: ``--data`` (default: the standard library) tokenized, up to ``max_bytes``.

    Cached in ``<checkpoint_dir>/tokens``, or in ``~/.cache/swarm/tokens`` without checkpoints.
    """
    root = Path(data_dir) if data_dir else default_corpus_dir()
    cache_dir = Path(checkpoint_dir or Path.home() / ".cache" / "swarm") / "tokens"
    return tokenize_corpus(list_text_files(root), tokenizer_path, max_bytes, cache_dir)


def member_seed(peer_id: str, seed: int) -> int:
    """The seed of a member's data order: its peer id mixed with the run's ``--seed``."""
    return int.from_bytes(peer_id.encode()[:8].ljust(8, b"\0"), "little") ^ seed


@dataclass
class WindowSampler:
    """Yields (batch, seq_len + 1) windows of a token stream in a per-peer seeded order.

    Args:
        tokens: the token stream.
        seq_len: tokens per training sequence (windows are one longer: inputs + next token).
        seed: the peer's seed; different seeds walk different permutations.
        position: how many windows were already consumed (restored from a checkpoint).
        holdout_windows: the last windows of the stream, never sampled, kept for evaluation.
    """

    tokens: np.ndarray
    seq_len: int
    seed: int
    position: int = 0
    holdout_windows: int = 0

    def __post_init__(self) -> None:
        total = len(self.tokens) // (self.seq_len + 1)
        self.train_windows = total - self.holdout_windows
        if self.train_windows < 1:
            raise ValueError(
                f"corpus too small: {len(self.tokens)} tokens for --seq-len {self.seq_len} "
                f"and {self.holdout_windows} held-out windows"
            )
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _window_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.train_windows)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.train_windows)
            self._epoch_order = (epoch, order)
        return int(self._epoch_order[1][offset])

    def _window(self, index: int) -> torch.Tensor:
        start = index * (self.seq_len + 1)
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) windows; advances :attr:`position`."""
        rows = [self._window(self._window_index(self.position + i)) for i in range(batch_size)]
        self.position += batch_size
        return torch.stack(rows)

    def holdout_batch(self, batch_size: int) -> torch.Tensor:
        """Held-out windows (the same for every peer), for evaluation."""
        if self.holdout_windows == 0:
            raise ValueError("no held-out windows configured")
        count = min(batch_size, self.holdout_windows)
        return torch.stack([self._window(self.train_windows + i) for i in range(count)])

"""Training checkpoints: written atomically, read back to resume after a crash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "trainer-state.pt"


def save_training_state(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/trainer-state.pt`` atomically (temp file, fsync, rename).

    A crash mid-write leaves the previous checkpoint intact.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_NAME
    partial = directory / f".{CHECKPOINT_NAME}.partial"
    with open(partial, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, final)
    return final


def load_training_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The last checkpoint in ``directory``, or None when there is none.

    Raises:
        ValueError: the file exists but cannot be read (names the path).
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--checkpoint-dir: cannot read {path}: {error}") from error

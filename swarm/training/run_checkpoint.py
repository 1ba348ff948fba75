"""A training member's checkpoints: what they hold, written atomically, read back to resume.

One file, ``<--checkpoint-dir>/trainer-state.pt``, holds a dict (read with
``torch.load(weights_only=True)``):

====================  ==================================================================
``outer``             ``theta_global``, outer momentum and round (``OuterOptimizer.state_dict``)
``model``             the local model's parameters (``theta_local``)
``inner``             the inner AdamW state
``schedule``          the inner learning-rate schedule
``inner_step``        inner steps done
``data_position``     windows of this member's data order consumed
``loss_history``      ``[(round, loss), ...]`` as published in the run record
``streaming``         streaming DiLoCo only: per fragment the samples since its last sync
                      and the eager history (``StreamingReplica.state_dict``)
====================  ==================================================================
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from swarm.training.replica import Replica

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


def checkpoint_refusal(
    parameters_finite: bool, probe_loss: float, last_good_loss: float | None, explosion_factor: float
) -> str | None:
    """Why a member must not overwrite its last good checkpoint now, or None when it may.

    Args:
        parameters_finite: whether every parameter is a finite number.
        probe_loss: the loss of the parameters to save, on the member's fixed probe batch.
        last_good_loss: the same loss when the last checkpoint was written (None: none yet).
        explosion_factor: a loss this many times the last good one counts as exploded.
    """
    if not parameters_finite:
        return "the parameters are not finite (NaN or infinity)"
    if not math.isfinite(probe_loss):
        return f"the loss is {probe_loss}"
    if last_good_loss is not None and probe_loss > explosion_factor * last_good_loss:
        return f"the loss exploded: {probe_loss:.4g} against {last_good_loss:.4g} at the last good checkpoint"
    return None


def checkpoint_state(
    replica: Replica, loss_history: list[tuple[int, float]], streaming: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint of a member (see the module docstring for the layout)."""
    state = {
        "outer": replica.outer.state_dict(),
        "model": replica.model.state_dict(),
        "inner": replica.inner.state_dict(),
        "schedule": replica.schedule.state_dict(),
        "inner_step": replica.inner_step,
        "data_position": replica.data_position,
        "loss_history": loss_history,
    }
    if streaming is not None:
        state["streaming"] = streaming
    return state


def restore_checkpoint(replica: Replica, checkpoint: dict[str, Any]) -> list[tuple[int, float]]:
    """Put a :func:`checkpoint_state` back into ``replica``; returns the loss history."""
    replica.outer.load_state_dict(checkpoint["outer"])
    replica.model.load_state_dict(checkpoint["model"])
    replica.inner.load_state_dict(checkpoint["inner"])
    replica.schedule.load_state_dict(checkpoint["schedule"])
    replica.inner_step = int(checkpoint["inner_step"])
    replica.data_position = int(checkpoint["data_position"])
    return [tuple(item) for item in checkpoint["loss_history"]]

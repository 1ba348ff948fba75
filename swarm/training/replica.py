"""This member's replica: the model it trains, its inner and outer optimisers, its data.

The replica is everything one DiLoCo member changes by itself: inner AdamW steps move
the local model (``theta_local``); an outer step applies the group's averaged
pseudo-gradient to ``theta_global`` and starts the next round from it. State
downloaded from another member replaces ``theta_global``; until the next outer step
the replica then contributes a zero update, since its local work so far started from
other parameters. What of it a checkpoint keeps is laid out in
:mod:`swarm.training.run_checkpoint`.
"""

from __future__ import annotations

import torch

from kernels.model import LocalModel
from swarm.training.data import WindowSampler
from swarm.training.diloco import (
    CachedHash,
    DiLoCoConfig,
    OuterOptimizer,
    flatten_parameters,
    load_flat_parameters_,
    make_inner_optimizer,
)
from swarm.training.training_model import language_model_loss


class Replica:
    """One member's model with its optimisers and data position.

    Args:
        model: the model to train (its parameters start ``theta_global``).
        config: inner and outer optimiser settings.
    """

    def __init__(self, model: LocalModel, config: DiLoCoConfig):
        self.model = model
        self.outer = OuterOptimizer(flatten_parameters(model), config)
        self.inner, self.schedule = make_inner_optimizer(model, config)
        self.sampler: WindowSampler | None = None
        self.inner_step = 0
        """Inner steps done, over all rounds."""
        self.zero_update_next_round = False
        """Set while the local work is relative to parameters other than ``theta_global``."""
        self._data_position = 0
        self._parameters_hash = CachedHash()

    @property
    def round(self) -> int:
        """Outer steps applied to ``theta_global``: the round this replica is in."""
        return self.outer.round

    def parameters_hash(self) -> str:
        """The hash of ``theta_global`` (cached until it changes)."""
        return self._parameters_hash(self.outer.parameters)

    # -- data ------------------------------------------------------------------------------

    def attach_data(self, tokens, seq_len: int, seed: int) -> None:
        """Sample inner batches from ``tokens`` in ``seed``'s order, from the restored position."""
        self.sampler = WindowSampler(tokens, seq_len, seed, self._data_position)

    @property
    def data_position(self) -> int:
        """Windows consumed so far (0 before data is attached)."""
        return self.sampler.position if self.sampler else 0

    @data_position.setter
    def data_position(self, position: int) -> None:
        self._data_position = position
        if self.sampler is not None:
            self.sampler.position = position

    # -- the DiLoCo steps ------------------------------------------------------------------

    def train_step(self, batch_size: int) -> float:
        """One inner AdamW step on the next ``batch_size`` windows; returns its loss."""
        batch = self.sampler.next_batch(batch_size)
        self.inner.zero_grad()
        loss = language_model_loss(self.model, batch)
        loss.backward()
        self.inner.step()
        self.schedule.step()
        return float(loss.detach())

    def pseudo_gradient(self) -> torch.Tensor:
        """``theta_global - theta_local``: this round's contribution, a new flat float32 vector."""
        return self.outer.pseudo_gradient(flatten_parameters(self.model))

    def apply_outer_step(self, averaged_pseudo_gradient: torch.Tensor) -> None:
        """Step ``theta_global`` with the group's average and restart the local model from it."""
        self.outer.step(averaged_pseudo_gradient)
        load_flat_parameters_(self.model, self.outer.parameters.detach())
        self.zero_update_next_round = False

    def load_global_state(self, state: dict) -> None:
        """Adopt another member's ``theta_global``, momentum and round (``OuterOptimizer.state_dict``)."""
        self.outer.load_state_dict(state)
        load_flat_parameters_(self.model, self.outer.parameters.detach())
        self.zero_update_next_round = True  # our local work so far is relative to other parameters

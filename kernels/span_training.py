"""A span's forward for training: LoRA, deep prompts and activation checkpointing, block by block.

``run_span_blocks`` runs ``BlockSpan.forward``'s loop (no cache, causal from position 0)
with, per row group of the batch, the client's LoRA adapters (``kernels/lora.py``), the
deep prompts added before each block (``kernels/deep_prompts.py``), and optionally
activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost"): each block then keeps only its input for the backward and recomputes its inner
activations there, so a span's graph holds one (batch, seq, hidden) tensor per block
instead of a dozen. The LoRA context is entered inside the checkpointed function, so
the recomputation sees the same adapters whatever thread runs it.

Both sides use it: the servers (``swarm/serving/training_server.py``) and the local
reference the swarm's gradients are compared with.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint as checkpointed

from kernels.deep_prompts import add_block_prompt
from kernels.lora import RowAdapters, lora_on_blocks
from kernels.model import BlockSpan


def run_span_blocks(
    span: BlockSpan,
    hidden: torch.Tensor,
    lora: list[RowAdapters] | None = None,
    prompts: torch.Tensor | None = None,
    checkpoint: bool = False,
) -> torch.Tensor:
    """hidden (batch, seq, hidden) through every block of ``span``.

    Args:
        lora: row groups with their adapters (tensors stacked over the span's blocks), or None.
        prompts: deep prompts (blocks, virtual, hidden) or per row (blocks, batch, virtual, hidden).
        checkpoint: keep only each block's input for the backward (when autograd records).
    """
    if prompts is not None and prompts.shape[0] != len(span.blocks):
        raise ValueError(f"prompts cover {prompts.shape[0]} blocks, the span has {len(span.blocks)}")
    use_checkpoint = checkpoint and torch.is_grad_enabled()
    for index, block in enumerate(span.blocks):
        groups = None if lora is None else [_block_slice(group, index) for group in lora]
        prompt = None if prompts is None else prompts[index]
        if use_checkpoint:
            hidden = checkpointed(_run_block, block, hidden, prompt, groups, use_reentrant=False)
        else:
            hidden = _run_block(block, hidden, prompt, groups)
    return hidden


def _block_slice(group: RowAdapters, index: int) -> RowAdapters:
    if not group.tensors:
        return group
    return RowAdapters(
        group.rows, {name: t[index : index + 1] for name, t in group.tensors.items()}, group.scaling
    )


def _run_block(block, hidden: torch.Tensor, prompt: torch.Tensor | None, groups) -> torch.Tensor:
    if prompt is not None:
        hidden = add_block_prompt(hidden, prompt)
    context = contextlib.nullcontext() if groups is None else lora_on_blocks([block], groups)
    with context:
        return block(hidden)

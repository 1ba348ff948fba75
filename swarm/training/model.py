"""The model a training run trains: our Llama-family blocks with a training-friendly init."""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.checkpoint import load_local_model
from kernels.config import ModelConfig, load_config
from kernels.model import BlockSpan, ClientPieces, LocalModel, TransformerBlock


def init_model(config: ModelConfig, seed: int) -> LocalModel:
    """A freshly initialised model (normal(0, 0.02) weights, unit norms, zero biases), same for a seed."""
    generator = torch.Generator().manual_seed(seed)
    model = LocalModel(
        ClientPieces(config), BlockSpan(config, [TransformerBlock(config) for _ in range(config.num_layers)])
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model


def load_or_init_model(checkpoint_dir: Path, random_init_seed: int | None) -> LocalModel:
    """The checkpoint's weights, or (with a seed) its config freshly initialised."""
    if random_init_seed is None:
        return load_local_model(checkpoint_dir)
    return init_model(load_config(checkpoint_dir), random_init_seed)


def language_model_loss(model: LocalModel, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (batch, seq + 1) token windows."""
    logits = model(windows[:, :-1])  # (batch, seq, vocab)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

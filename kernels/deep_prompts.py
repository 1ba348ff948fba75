"""Deep prompts (P-tuning v2, Liu et al. 2022; Petals' "deep_ptune"): trainable vectors at every block.

A ``DeepPrompt`` holds ``num_virtual_tokens`` input vectors, prepended to the token
embeddings as a ``SoftPrompt``'s are, and per block ``intermediate`` vectors
(blocks, virtual, hidden) that are added to the hidden states of those virtual
positions before that block (as Petals' servers do: ``hidden[:, :virtual] += prompt``).
The client owns and trains all of it; a server is sent its span's slice of
``intermediate`` with each request and returns the gradient of that slice.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.model_config import ModelConfig


class DeepPrompt(nn.Module):
    """``num_virtual_tokens`` input vectors and, per block, as many intermediate vectors.

    Args:
        config: the model (hidden size, number of blocks).
        num_virtual_tokens: prompt positions before every row.
        seed, std: the normal draw of the initial values.
    """

    def __init__(self, config: ModelConfig, num_virtual_tokens: int = 8, seed: int = 0, std: float = 0.02):
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"--prompt-tokens must be positive, got {num_virtual_tokens}")
        self.model_config = config
        generator = torch.Generator().manual_seed(seed)
        shape = (num_virtual_tokens, config.hidden_size)
        self.prompt_embeddings = nn.Parameter(torch.randn(shape, generator=generator) * std)
        self.intermediate = nn.Parameter(torch.randn((config.num_layers, *shape), generator=generator) * std)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def prepend(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, seq, hidden) -> (batch, virtual + seq, hidden)."""
        prompt = self.prompt_embeddings.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        return torch.cat([prompt, hidden], dim=1)

    def span_prompts(self, start: int, end: int) -> torch.Tensor:
        """The intermediate vectors of blocks ``[start, end)``: (blocks, virtual, hidden), a view."""
        return self.intermediate[start:end]


def add_block_prompt(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """hidden (batch, seq, hidden) with prompt (virtual, hidden), or one per row (batch, virtual,
    hidden), added to its first ``virtual`` positions."""
    virtual = prompt.shape[-2]
    if virtual > hidden.shape[1]:
        raise ValueError(f"{virtual} prompt vectors exceed the {hidden.shape[1]} positions of the input")
    return torch.cat([hidden[:, :virtual] + prompt.to(hidden.dtype), hidden[:, virtual:]], dim=1)

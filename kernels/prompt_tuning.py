"""Soft prompts (prompt tuning, Lester et al. 2021): trainable embeddings before the input.

``SoftPrompt`` holds ``num_virtual_tokens`` vectors of the model's hidden size that are
prepended to the token embeddings; only they are trained, the model stays frozen. Saved
in PEFT's PROMPT_TUNING layout (``adapter_config.json`` + ``adapter_model.safetensors``
with one tensor ``prompt_embeddings``), so ``peft`` loads it onto the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kernels.model_config import ModelConfig


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` trainable vectors (virtual, hidden) put before every row."""

    def __init__(self, config: ModelConfig, num_virtual_tokens: int = 8, seed: int = 0, std: float = 0.02):
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"--prompt-tokens must be positive, got {num_virtual_tokens}")
        self.model_config = config
        generator = torch.Generator().manual_seed(seed)
        self.prompt_embeddings = nn.Parameter(
            torch.randn(num_virtual_tokens, config.hidden_size, generator=generator) * std
        )

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def prepend(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, seq, hidden) -> (batch, virtual + seq, hidden)."""
        prompt = self.prompt_embeddings.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        return torch.cat([prompt, hidden], dim=1)


def save_prompt_peft(prompt: SoftPrompt, directory: str | Path, base_model: str = "") -> None:
    """Writes the soft prompt in PEFT's PROMPT_TUNING layout."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": prompt.prompt_embeddings.detach().contiguous().clone()},
              str(directory / "adapter_model.safetensors"))  # fmt: skip
    config = prompt.model_config
    meta = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": config.hidden_size, "num_transformer_submodules": 1,
        "num_attention_heads": config.num_heads, "num_layers": config.num_layers,
        "prompt_tuning_init": "RANDOM", "inference_mode": True, "base_model_name_or_path": base_model,
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2))


def load_prompt_peft(config: ModelConfig, directory: str | Path) -> SoftPrompt:
    """Reads a PEFT PROMPT_TUNING adapter for this model.

    Raises:
        ValueError: not a prompt-tuning adapter, or of another hidden size.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / "adapter_config.json").read_text())
    if meta.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"{directory} holds a {meta.get('peft_type')} adapter, not PROMPT_TUNING")
    value = load_file(str(directory / "adapter_model.safetensors"))["prompt_embeddings"]
    if value.dim() != 2 or value.shape[1] != config.hidden_size:
        raise ValueError(
            f"{directory}: prompt_embeddings {tuple(value.shape)} do not fit hidden size {config.hidden_size}"
        )
    prompt = SoftPrompt(config, value.shape[0])
    with torch.no_grad():
        prompt.prompt_embeddings.copy_(value)
    return prompt

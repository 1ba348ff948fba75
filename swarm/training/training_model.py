"""The model a training run trains: our Llama-family blocks with a training-friendly init, its
loss, and its export to a Hugging Face checkpoint (what `swarm demo` serves after training)."""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.checkpoint import load_local_model
from kernels.model import BlockSpan, ClientPieces, LocalModel, TransformerBlock
from kernels.model_config import ModelConfig, load_config


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


def hugging_face_state(model: LocalModel) -> dict[str, torch.Tensor]:
    """Our parameter names mapped to the Hugging Face Llama layout (tied heads written once)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("client.embed_tokens.") or name.startswith("client.norm."):
            hf_name = "model." + name.removeprefix("client.")
        elif name.startswith("client.lm_head."):
            if model.config.tie_word_embeddings:
                continue
            hf_name = name.removeprefix("client.")
        elif name.startswith("span.blocks."):
            hf_name = "model.layers." + name.removeprefix("span.blocks.")
        else:
            raise ValueError(f"unexpected parameter {name!r}")
        state[hf_name] = tensor.detach().clone()
    return state


def export_checkpoint(model: LocalModel, source_dir: Path, target_dir: Path, num_shards: int = 1) -> None:
    """Write ``model`` as a Hugging Face checkpoint, with ``source_dir``'s tokenizer files.

    The result loads with ``kernels.load_blocks`` span by span (and with ``transformers``).
    """
    import shutil

    from kernels.tiny import save_checkpoint

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target_dir, model.config, hugging_face_state(model), num_shards)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(source_dir) / name).exists():
            shutil.copy(Path(source_dir) / name, target_dir / name)

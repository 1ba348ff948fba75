"""Load a span of blocks, or the client pieces, from a Hugging Face checkpoint directory.

Only the safetensors files that hold the requested tensors are opened, and only those
tensors are read (``safe_open`` + ``get_tensor`` per name): a server serving blocks
10..20 of a 70B model never touches the other shards.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from kernels.config import ModelConfig, load_config
from kernels.model import BlockSpan, ClientPieces, LocalModel, TransformerBlock

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or tensors (fatal for this load)."""


def read_weight_map(checkpoint_dir: str | Path) -> dict[str, str]:
    """Tensor name -> file name (relative to the directory); reads headers only."""
    directory = Path(checkpoint_dir)
    index = directory / INDEX_FILE
    if index.exists():
        with open(index, encoding="utf-8") as file:
            return dict(json.load(file)["weight_map"])
    single = directory / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(str(single), framework="pt") as file:
        return dict.fromkeys(file.keys(), SINGLE_FILE)


def read_tensors(
    checkpoint_dir: str | Path,
    names: list[str],
    weight_map: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read exactly ``names``, opening each file that holds some of them once."""
    directory = Path(checkpoint_dir)
    weight_map = read_weight_map(directory) if weight_map is None else weight_map
    missing = [name for name in names if name not in weight_map]
    if missing:
        raise CheckpointError(f"{directory} lacks tensors: {', '.join(missing[:5])}")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_file[weight_map[name]].append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file_name, file_names in by_file.items():
        with safe_open(str(directory / file_name), framework="pt", device=str(device)) as file:
            for name in file_names:
                tensor = file.get_tensor(name)
                tensors[name] = tensor if dtype is None else tensor.to(dtype)
    return tensors


def _build(module_factory, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Construct on the meta device (no random init of big matrices), then adopt ``state``."""
    with torch.device("meta"):
        module = module_factory()
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_blocks(
    checkpoint_dir: str | Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
) -> BlockSpan:
    """Blocks [start, end) as a :class:`BlockSpan`, reading only their tensors."""
    config = load_config(checkpoint_dir) if config is None else config
    if not 0 <= start < end <= config.num_layers:
        raise ValueError(f"span [{start}, {end}) is outside the model's {config.num_layers} blocks")
    weight_map = read_weight_map(checkpoint_dir)
    blocks = []
    for index in range(start, end):
        prefix = f"model.layers.{index}."
        names = [name for name in weight_map if name.startswith(prefix)]
        tensors = read_tensors(checkpoint_dir, names, weight_map, dtype, device)
        state = {name[len(prefix) :]: tensor for name, tensor in tensors.items()}
        # Some exports carry a stale rotary buffer; we compute it ourselves.
        state.pop("self_attn.rotary_emb.inv_freq", None)
        blocks.append(_build(lambda: TransformerBlock(config), state))
    return BlockSpan(config, blocks, start)


def load_client_pieces(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
) -> ClientPieces:
    """Embeddings, final norm and LM head; the head shares the embedding when tied."""
    config = load_config(checkpoint_dir) if config is None else config
    weight_map = read_weight_map(checkpoint_dir)
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    tensors = read_tensors(checkpoint_dir, list(names.values()), weight_map, dtype, device)
    state = {ours: tensors[theirs] for ours, theirs in names.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    pieces = _build(lambda: ClientPieces(config), state)
    if config.tie_word_embeddings:  # load_state_dict(assign=True) may have split the tie
        pieces.lm_head.weight = pieces.embed_tokens.weight
    return pieces


def load_local_model(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> LocalModel:
    """The whole model in this process."""
    config = load_config(checkpoint_dir)
    client = load_client_pieces(checkpoint_dir, dtype, device, config)
    return LocalModel(client, load_blocks(checkpoint_dir, 0, config.num_layers, dtype, device, config))

"""Load a span of blocks, or the client pieces, from a checkpoint: a Hugging Face
directory or a GGUF file.

Only the safetensors files that hold the requested tensors are opened, and only those
tensors are read (``safe_open`` + ``get_tensor`` per name): a server serving blocks
10..20 of a 70B model never touches the other shards. A path ending in ``.gguf`` is
read through :mod:`kernels.gguf` (memory-mapped, only the span's tensors dequantized;
with ``keep_quantized``, Q8_0 / Q4_0 weights stay codes, see :mod:`kernels.gguf_quant`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from kernels.gguf import block_tensor_names, is_gguf, read_gguf_tensors
from kernels.model import BlockSpan, ClientPieces, LocalModel, TransformerBlock
from kernels.model_config import ModelConfig, load_config

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
    keep_quantized: bool = False,
) -> BlockSpan:
    """Blocks [start, end) as a :class:`BlockSpan`, reading only their tensors.

    ``keep_quantized`` (GGUF only): Q8_0 / Q4_0 linear weights become ``QuantizedLinear``
    layers holding the file's codes; other tensors are dequantized to ``dtype``.
    """
    config = load_config(checkpoint_dir) if config is None else config
    if not 0 <= start < end <= config.num_layers:
        raise ValueError(f"span [{start}, {end}) is outside the model's {config.num_layers} blocks")
    if is_gguf(checkpoint_dir):
        blocks = [
            _load_gguf_block(checkpoint_dir, index, config, dtype, device, keep_quantized)
            for index in range(start, end)
        ]
        return BlockSpan(config, blocks, start)
    if keep_quantized:
        raise ValueError("keep_quantized needs a GGUF checkpoint (a directory holds no quantized weights)")
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


def _load_gguf_block(path, index: int, config: ModelConfig, dtype, device, keep_quantized: bool):
    """Block ``index`` of a GGUF file; with ``keep_quantized``, Q8_0 / Q4_0 linears keep their codes."""
    from kernels.gguf_quant import keepable, read_quantized_linear

    prefix = f"model.layers.{index}."
    names = block_tensor_names(path, index)
    kept = {}  # module name in the block -> weight name (ours)
    if keep_quantized:
        kept = {name[len(prefix) : -len(".weight")]: name for name in names
                if name.endswith("_proj.weight") and keepable(path, name)}  # fmt: skip
    plain = [name for name in names if name not in kept.values()]
    state = {
        name[len(prefix) :]: t for name, t in read_gguf_tensors(path, plain, config, dtype, device).items()
    }
    with torch.device("meta"):
        block = TransformerBlock(config)
    for module_name, weight_name in kept.items():
        layer = read_quantized_linear(
            path, weight_name, config, dtype, device, state.pop(module_name + ".bias", None)
        )
        parent, child = module_name.rsplit(".", 1)
        setattr(block.get_submodule(parent), child, layer)
        state.update({f"{module_name}.{key}": value for key, value in layer.state_dict().items()})
    block.load_state_dict(state, strict=True, assign=True)
    return block


def load_client_pieces(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
) -> ClientPieces:
    """Embeddings, final norm and LM head; the head shares the embedding when tied."""
    config = load_config(checkpoint_dir) if config is None else config
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    if is_gguf(checkpoint_dir):
        tensors = read_gguf_tensors(checkpoint_dir, list(names.values()), config, dtype, device)
    else:
        tensors = read_tensors(checkpoint_dir, list(names.values()), None, dtype, device)
    state = {ours: tensors[theirs] for ours, theirs in names.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    pieces = _build(lambda: ClientPieces(config), state)
    if config.tie_word_embeddings:  # load_state_dict(assign=True) may have split the tie
        pieces.lm_head.weight = pieces.embed_tokens.weight
    return pieces


def load_local_model(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    keep_quantized: bool = False,
) -> LocalModel:
    """The whole model in this process."""
    config = load_config(checkpoint_dir)
    client = load_client_pieces(checkpoint_dir, dtype, device, config)
    blocks = load_blocks(checkpoint_dir, 0, config.num_layers, dtype, device, config, keep_quantized)
    return LocalModel(client, blocks)

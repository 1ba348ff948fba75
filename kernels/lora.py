"""LoRA adapters on the blocks' linears, owned by whoever trains them (PEFT-compatible).

A LoRA adapter adds ``scaling * B @ A @ x`` to a frozen linear ``W x`` (Hu et al. 2021,
"LoRA: Low-Rank Adaptation"), with ``scaling = alpha / rank`` as in PEFT. Targets are
the short names ``q, k, v, o, gate, up, down`` (``self_attn.q_proj`` ... ``mlp.down_proj``).

``LoraAdapters`` holds one stacked tensor per (target, A|B) for a range of blocks:
``A[target]`` (blocks, rank, in_features) and ``B[target]`` (blocks, out_features, rank),
so a span's adapters travel as at most 14 tensors whatever the span's length
(``span_tensors``). ``lora_applied(span, tensors, scaling)`` runs a ``BlockSpan`` with
them: the frozen linears (plain or ``QuantizedLinear``, so QLoRA-style too) are not
changed; a forward hook adds the low-rank term only inside the context (a context
variable, so concurrent forwards of the same blocks without adapters are untouched).

``save_peft`` / ``load_peft`` read and write PEFT's layout (``adapter_config.json`` +
``adapter_model.safetensors``, keys
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels.model import BlockSpan
from kernels.model_config import ModelConfig

TARGET_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_PEFT_PREFIX = "base_model.model.model.layers."


@dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling and targets of a LoRA adapter.

    Attributes:
        rank: the inner dimension r of ``B @ A``.
        alpha: PEFT's ``lora_alpha``; the update is scaled by ``alpha / rank``.
        targets: short names of the adapted linears (see ``TARGET_MODULES``).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--rank must be positive, got {self.rank}")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(
                f"--targets must be a non-empty subset of {','.join(TARGET_MODULES)}, got {unknown}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def linear_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(out_features, in_features) of a target linear."""
    h, inner, q_out = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    kv_out = config.num_kv_heads * config.head_dim
    return {"q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out),
            "gate": (inner, h), "up": (inner, h), "down": (h, inner)}[target]  # fmt: skip


def tensor_shapes(config: ModelConfig, lora: LoraConfig, blocks: int) -> dict[str, tuple[int, ...]]:
    """The wire names and shapes of a span's adapters: ``"q.A"`` (blocks, r, in), ``"q.B"`` (blocks, out, r)."""
    shapes = {}
    for target in lora.targets:
        out_features, in_features = linear_shape(config, target)
        shapes[f"{target}.A"] = (blocks, lora.rank, in_features)
        shapes[f"{target}.B"] = (blocks, out_features, lora.rank)
    return shapes


class LoraAdapters(nn.Module):
    """Trainable LoRA tensors for every block of a model (the client owns them).

    A is drawn like PEFT's default (Kaiming-uniform), B starts at zero so the adapted
    model starts equal to the base; ``init_b_std > 0`` draws B too (tests want nonzero
    gradients of A).
    """

    def __init__(self, config: ModelConfig, lora: LoraConfig, seed: int = 0, init_b_std: float = 0.0):
        super().__init__()
        self.model_config, self.lora = config, lora
        generator = torch.Generator().manual_seed(seed)
        self.tensors = nn.ParameterDict()
        for name, shape in tensor_shapes(config, lora, config.num_layers).items():
            if name.endswith(".A"):
                bound = 1.0 / shape[-1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on (r, in)
                value = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            else:
                value = torch.randn(shape, generator=generator) * init_b_std
            self.tensors[name.replace(".", "_")] = nn.Parameter(value)

    def span_tensors(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """The adapters of blocks ``[start, end)`` by wire name (views: gradients reach the parameters)."""
        return {key.replace("_", ".", 1): value[start:end] for key, value in self.tensors.items()}


def check_span_tensors(
    config: ModelConfig, tensors: dict[str, torch.Tensor], blocks: int
) -> tuple[int, tuple[str, ...]]:
    """Validates a span's adapters from the network; returns (rank, targets).

    Raises:
        ValueError: unknown names, A without B, wrong shapes, non-float or non-finite values.
    """
    targets = tuple(sorted({name.split(".")[0] for name in tensors}))
    if not tensors or any(t not in TARGET_MODULES for t in targets):
        raise ValueError(
            f"adapter names must be <target>.A / <target>.B with targets in {list(TARGET_MODULES)}"
        )
    rank = tensors[next(iter(tensors))].shape[1] if tensors[next(iter(tensors))].dim() == 3 else 0
    lora = LoraConfig(rank=max(rank, 1), targets=targets)
    expected = tensor_shapes(config, lora, blocks)
    if set(tensors) != set(expected):
        raise ValueError(f"adapters must come in A/B pairs: got {sorted(tensors)}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"adapter {name} must have shape {expected[name]}, got {tuple(tensor.shape)}")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"adapter {name} must be finite floats")
    return rank, targets


def adapter_hash(tensors: dict[str, torch.Tensor], scaling: float) -> bytes:
    """A content hash of a span's adapters and scaling (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(float(scaling)).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


@dataclass(frozen=True)
class RowAdapters:
    """The adapters of ``rows`` consecutive rows of a batch (several clients' requests in one forward).

    Attributes:
        rows: how many rows (the groups of a batch follow each other in order).
        tensors: wire names -> tensors stacked over the blocks run; None: these rows run unadapted.
        scaling: the low-rank term's factor.
    """

    rows: int
    tensors: dict[str, torch.Tensor] | None
    scaling: float = 1.0


# Maps id(linear) -> [(rows, A (r, in) | None, B (out, r) | None, scaling)] (one entry per row
# group, in batch order; a single group covers the whole batch) while a context is open.
_ACTIVE: contextvars.ContextVar[dict[int, list[tuple]] | None] = contextvars.ContextVar(
    "active_lora", default=None
)
_HOOKED = "_lora_hook_attached"


def _add_low_rank(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    active = _ACTIVE.get()
    groups = None if active is None else active.get(id(module))
    if groups is None:
        return output
    x = inputs[0]
    if len(groups) == 1:
        _, a, b, scaling = groups[0]
        if a is None:
            return output
        return output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scaling
    parts, row = [], 0
    for rows, a, b, scaling in groups:  # each group's rows with its own adapters
        part = output[row : row + rows]
        if a is not None:
            part = part + F.linear(F.linear(x[row : row + rows], a.to(x.dtype)), b.to(x.dtype)) * scaling
        parts.append(part)
        row += rows
    return torch.cat(parts)


def attach_hooks(span: BlockSpan, targets: tuple[str, ...] = tuple(TARGET_MODULES)) -> None:
    """Adds the (dormant) LoRA hook to the targets of every block of ``span``, once."""
    _attach(span.blocks, targets)


def _attach(blocks, targets: tuple[str, ...]) -> None:
    for block in blocks:
        for target in targets:
            module = block.get_submodule(TARGET_MODULES[target])
            if not getattr(module, _HOOKED, False):
                module.register_forward_hook(_add_low_rank)
                setattr(module, _HOOKED, True)


@contextlib.contextmanager
def lora_applied(span: BlockSpan, tensors: dict[str, torch.Tensor], scaling: float) -> Iterator[None]:
    """Runs ``span`` with the adapters ``tensors`` (wire names, stacked over the span's blocks)."""
    with lora_on_blocks(list(span.blocks), [RowAdapters(0, tensors, scaling)]):
        yield


@contextlib.contextmanager
def lora_on_blocks(blocks, groups: list[RowAdapters]) -> Iterator[None]:
    """Runs ``blocks`` (a list of blocks) with each row group's adapters (stacked over ``blocks``).

    One group applies to the whole batch whatever its ``rows``; several split the batch in order.
    """
    targets = tuple(sorted({name.split(".")[0] for g in groups if g.tensors for name in g.tensors}))
    _attach(blocks, targets)
    active: dict[int, list[tuple]] = {}
    for index, block in enumerate(blocks):
        for target in targets:
            module = block.get_submodule(TARGET_MODULES[target])
            active[id(module)] = [
                (g.rows, g.tensors[f"{target}.A"][index], g.tensors[f"{target}.B"][index], g.scaling)
                if g.tensors and f"{target}.A" in g.tensors else (g.rows, None, None, g.scaling)
                for g in groups
            ]  # fmt: skip
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def save_peft(adapters: LoraAdapters, directory: str | Path, base_model: str = "") -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT does."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora, state = adapters.lora, {}
    for key, value in adapters.tensors.items():
        target, part = key.split("_", 1)
        for layer in range(value.shape[0]):
            name = f"{_PEFT_PREFIX}{layer}.{TARGET_MODULES[target]}.lora_{part}.weight"
            state[name] = value[layer].detach().contiguous().clone()
    save_file(state, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": [TARGET_MODULES[t].split(".")[1] for t in lora.targets],
        "base_model_name_or_path": base_model,
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_peft(config: ModelConfig, directory: str | Path) -> LoraAdapters:
    """Reads a PEFT LoRA adapter (this layout, for this model) into ``LoraAdapters``.

    Raises:
        ValueError: not a LoRA adapter, or its tensors do not fit ``config``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / "adapter_config.json").read_text())
    if meta.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {meta.get('peft_type')} adapter, not LORA")
    short = {full.split(".")[1]: name for name, full in TARGET_MODULES.items()}
    targets = tuple(short[name] for name in meta["target_modules"])
    lora = LoraConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), targets=targets)
    adapters = LoraAdapters(config, lora)
    state = load_file(str(directory / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, value in adapters.tensors.items():
            target, part = key.split("_", 1)
            for layer in range(value.shape[0]):
                name = f"{_PEFT_PREFIX}{layer}.{TARGET_MODULES[target]}.lora_{part}.weight"
                if name not in state or tuple(state[name].shape) != tuple(value[layer].shape):
                    raise ValueError(f"{directory}: {name} is missing or has the wrong shape")
                value[layer].copy_(state[name])
    return adapters


def local_forward(
    model, input_ids: torch.Tensor, adapters: LoraAdapters | None = None, prompt=None
) -> torch.Tensor:
    """A ``LocalModel``'s logits with LoRA ``adapters`` and a ``SoftPrompt`` or ``DeepPrompt`` (the
    local reference that training through the swarm must equal): (batch, virtual + seq, vocab) float32."""
    hidden = model.client.embed(input_ids)
    if prompt is not None:
        hidden = prompt.prepend(hidden)
    deep = getattr(prompt, "intermediate", None)  # a DeepPrompt: its vectors before every block
    if deep is not None:
        from kernels.span_training import run_span_blocks  # it builds on this module

        lora = None
        if adapters is not None:
            tensors = adapters.span_tensors(model.span.start, model.span.end)
            lora = [RowAdapters(input_ids.shape[0], tensors, adapters.lora.scaling)]
        return model.client.logits(run_span_blocks(model.span, hidden, lora, deep))
    if adapters is None:
        return model.client.logits(model.span(hidden))
    tensors = adapters.span_tensors(model.span.start, model.span.end)
    with lora_applied(model.span, tensors, adapters.lora.scaling):
        return model.client.logits(model.span(hidden))

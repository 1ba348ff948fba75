"""A fine-tuning run through the swarm: data, trainable parameters, optimizer, saving, resuming.

``FinetuneRun`` trains LoRA adapters (``kernels/lora.py``) or a soft prompt
(``kernels/prompt_tuning.py``) of a ``RemoteModel`` whose blocks stay frozen on the
servers (``remote_training.py``). Batches are windows of ``seq_len + 1`` tokens of the
concatenated text files, their offsets drawn from a generator seeded by (seed, step),
so a resumed run sees the batches an uninterrupted one would. ``save`` writes the
adapter in the PEFT layout plus ``training_state.pt`` (step and optimizer state) next
to it; ``FinetuneRun(..., out=DIR)`` resumes from them when they are there.
`swarm finetune` (``peers/finetune.py``) is the process around it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.lora import LoraAdapters, LoraConfig, load_peft, save_peft
from kernels.prompt_tuning import SoftPrompt, load_prompt_peft, save_prompt_peft

METHODS = ("lora", "prompt")
STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """What `swarm finetune` trains and how (its flags map onto these fields)."""

    method: str = field(default="lora", metadata={"help": "lora|prompt: what the client trains"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha/rank)"})
    targets: str = field(default="q,v", metadata={"help": "LoRA targets among q,k,v,o,gate,up,down"})
    prompt_tokens: int = field(default=16, metadata={"help": "soft-prompt length (method prompt)"})
    steps: int = field(
        default=100, metadata={"help": "optimizer steps in all (a resumed run goes on to this)"}
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    batch: int = field(default=4, metadata={"help": "rows per step"})
    seq_len: int = field(default=64, metadata={"help": "tokens per row"})
    seed: int = field(default=0, metadata={"help": "seed of the initial parameters and of the batches"})
    save_every: int = field(default=20, metadata={"help": "steps between saves (0: only at the end)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        for name in ("rank", "prompt_tokens", "steps", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.lr <= 0 or self.save_every < 0:
            raise ValueError("--lr must be positive and --save-every not negative")
        self.lora_config()  # validates --targets

    def lora_config(self) -> LoraConfig:
        targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=targets)


def load_adapter(config, directory: str | Path) -> tuple[LoraAdapters | None, SoftPrompt | None]:
    """A PEFT adapter folder as ``(adapters, prompt)``: LoRA or a soft prompt, the other None.

    Raises:
        ValueError: neither a LORA nor a PROMPT_TUNING adapter, or not for this model.
        OSError: the folder or its files cannot be read.
    """
    kind = json.loads((Path(directory) / "adapter_config.json").read_text()).get("peft_type")
    if kind == "LORA":
        return load_peft(config, directory), None
    if kind == "PROMPT_TUNING":
        return None, load_prompt_peft(config, directory)
    raise ValueError(f"{directory}: peft_type {kind!r} is neither LORA nor PROMPT_TUNING")


def load_token_stream(tokenizer, files: list[str | Path]) -> torch.Tensor:
    """The files' text, tokenized and concatenated: (tokens,) int64.

    Raises:
        ValueError: no tokenizer, or fewer tokens than one row needs (checked by the caller).
    """
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer.json: fine-tuning on text needs one")
    ids: list[int] = []
    for path in files:
        ids.extend(tokenizer.encode(Path(path).read_text(encoding="utf-8")))  # a kernels.TextTokenizer
    return torch.tensor(ids, dtype=torch.int64)


def draw_batch(stream: torch.Tensor, config: FinetuneConfig, step: int) -> torch.Tensor:
    """Rows (batch, seq_len + 1) of ``stream`` at offsets drawn for ``step``."""
    window = config.seq_len + 1
    if stream.numel() < window:
        raise ValueError(f"the data has {stream.numel()} tokens; --seq-len {config.seq_len} needs {window}")
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    offsets = torch.randint(0, stream.numel() - window + 1, (config.batch,), generator=generator)
    return torch.stack([stream[o : o + window] for o in offsets.tolist()])


class FinetuneRun:
    """The trainable parameters, the optimizer and the step count of one run.

    Args:
        model: a connected ``RemoteModel`` (``forward`` is called from this thread).
        config: what to train.
        out: the adapter folder; a run saved there is resumed.
    """

    def __init__(self, model, config: FinetuneConfig, out: str | Path):
        self.model, self.config, self.out = model, config, Path(out)
        self.step = 0
        model_config = model.model_config
        resuming = (self.out / STATE_FILE).exists()
        if config.method == "lora":
            self.adapters = load_peft(model_config, self.out) if resuming else LoraAdapters(
                model_config, config.lora_config(), seed=config.seed
            )  # fmt: skip
            self.prompt = None
            parameters = list(self.adapters.parameters())
        else:
            self.adapters = None
            self.prompt = load_prompt_peft(model_config, self.out) if resuming else SoftPrompt(
                model_config, config.prompt_tokens, seed=config.seed
            )  # fmt: skip
            parameters = list(self.prompt.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
        if resuming:
            state = torch.load(self.out / STATE_FILE, weights_only=True)
            self.step = int(state["step"])
            self.optimizer.load_state_dict(state["optimizer"])

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.num_virtual_tokens

    def train_step(self, rows: torch.Tensor) -> float:
        """One optimizer step on rows (batch, seq_len + 1); returns the loss."""
        inputs, labels = rows[:, :-1], rows[:, 1:]
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model.forward(inputs, adapters=self.adapters, prompts=self.prompt)
        logits = logits[:, self.virtual_tokens :]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def save(self) -> None:
        """Writes the adapter (PEFT layout) and the training state, the state last (a resume
        never finds a state newer than its adapter)."""
        base = str(self.model.checkpoint_dir)
        if self.adapters is not None:
            save_peft(self.adapters, self.out, base_model=base)
        else:
            save_prompt_peft(self.prompt, self.out, base_model=base)
        partial = self.out / (STATE_FILE + ".tmp")
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict()}, partial)
        partial.replace(self.out / STATE_FILE)
        (self.out / "finetune.json").write_text(json.dumps({"step": self.step, "method": self.config.method}))

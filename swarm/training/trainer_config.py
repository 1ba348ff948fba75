"""The settings of one training member (``swarm train`` maps its flags 1:1 onto them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.training.allreduce import AllReduceTimeouts
from swarm.training.diloco import DiLoCoConfig
from swarm.training.robust import RobustConfig
from swarm.training.streaming import StreamingConfig


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of one training member; ``swarm train`` maps its flags 1:1 onto these."""

    run: str = _opt("demo", "name of the training run to start or join")
    model: str = _opt(
        "", "checkpoint directory: config.json, tokenizer.json and (unless --init random) weights"
    )
    init: str = _opt(
        "checkpoint", "how the first member initialises the run: 'checkpoint' weights or 'random'"
    )
    seed: int = _opt(0, "seed of the random init and of this peer's data order (mixed with its peer id)")
    data: str = _opt("", "directory of text files; empty: the Python standard library's sources")
    corpus_bytes: int = _opt(4_000_000, "bytes of text to read from the corpus")
    seq_len: int = _opt(128, "tokens per training sequence")
    batch_size: int = _opt(8, "sequences per inner step")
    inner_steps: int = _opt(50, "H: inner steps per round (ignored with --round-seconds)")
    round_seconds: float = _opt(
        0.0, "end each round after this many seconds of inner steps instead (0: use H)"
    )
    max_rounds: int = _opt(0, "stop after this many outer rounds (0: run until stopped)")
    compression: str = _opt("int8", "pseudo-gradient codec on the wire: int8, 4bit, fp16 or none")
    inner_lr: float = _opt(4e-4, "peak inner AdamW learning rate (DiLoCo: 4e-4)")
    warmup_steps: int = _opt(100, "inner learning-rate warm-up steps")
    outer_lr: float = _opt(0.7, "outer Nesterov learning rate (DiLoCo: 0.7)")
    outer_momentum: float = _opt(0.9, "outer Nesterov momentum (DiLoCo: 0.9)")
    matchmaking_seconds: float = _opt(15.0, "how long a round's leader waits for the other members")
    phase_timeout: float = _opt(60.0, "deadline of each all-reduce phase, in seconds")
    bandwidth: float = _opt(100e6, "declared bytes/s; sets this member's share of the all-reduce")
    checkpoint_dir: str = _opt("", "write checkpoints here and resume from them (empty: no checkpoints)")
    record_ttl: float = _opt(30.0, "seconds this member's run record lives unless refreshed")
    aggregation: str = _opt(
        "centered_clip",
        "how reducers combine contributions: centered_clip (BTARD), trimmed_mean, or mean (no defence "
        "at all: no validation or clipping either); "
        "every member of a run must use the same",
    )
    max_weight_ratio: float = _opt(
        2.0, "a contribution's sample weight counts at most this many times the round's median"
    )
    max_norm_ratio: float = _opt(
        1.0, "a contribution's norm is clipped to this many times the round's lower median norm"
    )
    verify_reducers: bool = _opt(
        True, "backups recompute every reduced part and dispute a reducer that disagrees (1.5x scatter bytes)"
    )
    streaming_fragments: int = _opt(
        1,
        "P: sync the model in P fragments (blocks strided over depth), one every H/P inner steps (1: plain)",
    )
    overlap_steps: int = _opt(
        0, "tau: inner steps a fragment's all-reduce may overlap before its result is needed (0: wait)"
    )
    mix_alpha: float = _opt(
        0.5, "after an overlapped sync: local fragment = alpha * local + (1 - alpha) * new global"
    )
    eager: bool = _opt(
        False, "eager updates: while a sync is in flight, step the fragment with our own fresh outer gradient"
    )
    checkpoint_explosion_factor: float = _opt(
        2.0, "keep the last good checkpoint when the loss has grown this many times since it was written"
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(
                "--model is required: a checkpoint directory with config.json and tokenizer.json"
            )
        if self.init not in ("checkpoint", "random"):
            raise ValueError(f"--init must be 'checkpoint' or 'random', got {self.init!r}")
        for name in ("seq_len", "batch_size", "inner_steps", "corpus_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.matchmaking_seconds <= 0 or self.phase_timeout <= 0 or self.record_ttl <= 0:
            raise ValueError("--matchmaking-seconds, --phase-timeout and --record-ttl must be positive")
        if self.checkpoint_explosion_factor <= 1:
            raise ValueError("--checkpoint-explosion-factor must be greater than 1")
        self.robust  # noqa: B018 (validates --aggregation, --max-weight-ratio, --max-norm-ratio)
        self.streaming  # noqa: B018 (validates --streaming-fragments, --overlap-steps, --mix-alpha)
        if self.streaming.enabled and self.round_seconds:
            raise ValueError("--streaming-fragments / --overlap-steps / --eager need --round-seconds 0")

    @property
    def streaming(self) -> StreamingConfig:
        """Streaming DiLoCo's settings (raises ValueError naming the flag)."""
        return StreamingConfig(
            fragments=self.streaming_fragments,
            overlap_steps=self.overlap_steps,
            mix_alpha=self.mix_alpha,
            eager=self.eager,
            inner_steps=self.inner_steps,
        )

    @property
    def robust(self) -> RobustConfig:
        """How this member's reducers validate and aggregate (raises ValueError naming the flag)."""
        return RobustConfig(
            rule=self.aggregation, max_weight_ratio=self.max_weight_ratio, max_norm_ratio=self.max_norm_ratio
        )

    @property
    def diloco(self) -> DiLoCoConfig:
        return DiLoCoConfig(
            inner_lr=self.inner_lr,
            warmup_steps=self.warmup_steps,
            outer_lr=self.outer_lr,
            outer_momentum=self.outer_momentum,
        )

    @property
    def allreduce_timeouts(self) -> AllReduceTimeouts:
        """Every all-reduce phase gets ``--phase-timeout``; one request at most 10 s of it."""
        return AllReduceTimeouts(
            scatter=self.phase_timeout,
            gather=self.phase_timeout,
            repair=self.phase_timeout,
            call=min(10.0, self.phase_timeout),
        )

    @property
    def random_init_seed(self) -> int | None:
        """The seed of the run's random init, or None to load the checkpoint's weights."""
        return self.seed if self.init == "random" else None

"""The health page's memory: a rolling window of the swarm's vital numbers, bounded in time and size.

Each snapshot offers a sample (coverage minimum, servers online, the bottleneck
tokens/s, and per training run loss, tokens/s, members and bytes per round); samples
closer together than ``window / max_points`` are skipped, samples older than ``window``
are dropped, and at most ``max_points`` are kept, so memory stays bounded however often
the page refreshes. Runs are capped at ``swarm.training.progress.MAX_RUNS`` per sample.
Time is passed in (DHT/unix seconds), so tests run in milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from typing import Any

from swarm.training.progress import MAX_RUNS

SERIES = ("coverage_min", "servers_online", "tokens_per_second")
RUN_SERIES = ("loss", "tokens_per_second", "members", "bytes_per_round")


@dataclasses.dataclass(frozen=True)
class HistoryConfig:
    """How much history the health page keeps.

    Attributes:
        window: seconds of history kept (``--history-window``); at least an hour by default.
        max_points: samples kept at most; the spacing between samples is ``window / max_points``.
    """

    window: float = 3600.0
    max_points: int = 720

    def __post_init__(self) -> None:
        if not self.window > 0:
            raise ValueError(f"--history-window must be positive, got {self.window}")
        if not 2 <= self.max_points <= 100_000:
            raise ValueError(f"history max_points must be in 2..100000, got {self.max_points}")


@dataclasses.dataclass(frozen=True)
class _Sample:
    time: float
    values: tuple[float | None, ...]
    runs: Mapping[str, tuple[float | None, ...]]


def sample_state(
    state: Mapping[str, Any],
) -> tuple[tuple[float | None, ...], dict[str, tuple[float | None, ...]]]:
    """The numbers one snapshot contributes: ``(SERIES values, {run: RUN_SERIES values})``."""
    model = state.get("model")
    coverage = state.get("coverage") or {}
    online = sum(server["state"] == "online" for server in state.get("servers", ()))
    values = (
        coverage.get("min_servers") if model is not None else None,
        online,
        coverage.get("bottleneck_tokens_per_second") if model is not None else None,
    )
    runs = {
        run["name"]: (run["loss"], run["tokens_per_second"], run["members"], run["bytes_per_round"])
        for run in list(state.get("runs", ()))[:MAX_RUNS]
    }
    return values, runs


class HealthHistory:
    """A rolling window of samples (see the module docstring)."""

    def __init__(self, config: HistoryConfig = HistoryConfig()):
        self.config = config
        self._samples: deque[_Sample] = deque(maxlen=config.max_points)

    def __len__(self) -> int:
        return len(self._samples)

    def observe(self, state: Mapping[str, Any], now: float) -> bool:
        """Offers the snapshot ``state`` taken at ``now``; returns whether it was kept."""
        spacing = self.config.window / self.config.max_points
        if self._samples and now - self._samples[-1].time < spacing:
            return False
        values, runs = sample_state(state)
        self._samples.append(_Sample(now, values, runs))
        while self._samples and now - self._samples[0].time > self.config.window:
            self._samples.popleft()
        return True

    def to_json(self) -> dict[str, Any]:
        """The ``history`` entry of ``/api/state`` (schema in ``swarm.health``)."""
        samples = list(self._samples)
        swarm: dict[str, list] = {"t": [sample.time for sample in samples]}
        for index, name in enumerate(SERIES):
            swarm[name] = [sample.values[index] for sample in samples]
        runs: dict[str, dict[str, list]] = {}
        for name in sorted({run for sample in samples for run in sample.runs})[:MAX_RUNS]:
            series: dict[str, list] = {"t": []}
            for key in RUN_SERIES:
                series[key] = []
            for sample in samples:
                values = sample.runs.get(name)
                if values is None:
                    continue
                series["t"].append(sample.time)
                for key, value in zip(RUN_SERIES, values, strict=True):
                    series[key].append(value)
            runs[name] = series
        return {"window": self.config.window, "swarm": swarm, "runs": runs}

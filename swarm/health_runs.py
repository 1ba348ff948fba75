"""The training-runs part of the health snapshot: progress, stalls, loss curves, agreement.

One entry of ``/api/state``'s ``runs`` list per run (schema in ``swarm.health``), built
from the members' ``TrainingPeerRecord``s (``swarm.training.progress``). A run is
stalled when its round has not changed, or no member has updated its record, for
``stall_after`` seconds; :class:`RunProgressTracker` remembers when each round was
first seen, across snapshots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from swarm.health_display import alert, clip_text, finite, short_id
from swarm.training.progress import TrainerState, TrainingPeerRecord

MAX_CURVE_POINTS = 256


class RunProgressTracker:
    """Remembers when each run last reached a new round, to tell stalled runs apart.

    Time is passed in (DHT/unix seconds), so tests run in milliseconds.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}

    def observe(self, run: str, round_: int, now: float) -> float:
        """Records the run's current round.

        Returns:
            Seconds since the run's round last changed (0 on first sight).
        """
        previous = self._seen.get(run)
        if previous is None or round_ != previous[0]:
            self._seen[run] = (round_, now)
            return 0.0
        return max(0.0, now - previous[1])


def run_state(
    name: str,
    members: Mapping[str, TrainingPeerRecord],
    tracker: RunProgressTracker,
    now: float,
    stall_after: float,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """One run's ``runs`` entry and its alerts (``empty_run``, ``stalled_run``, ``hash_mismatch``).

    Args:
        name: the run name.
        members: the members' records by peer id (MQTT telemetry already overlaid).
        tracker: remembers round progress across snapshots.
        now: current DHT (unix) time in seconds.
        stall_after: seconds without a new round or a record update before the run is stalled.
    """
    alerts = []
    active = {peer: record for peer, record in members.items() if record.state != TrainerState.LEAVING}
    round_ = max((record.round for record in members.values()), default=0)
    since = tracker.observe(name, round_, now)
    newest_update = max((record.updated_at for record in members.values()), default=now)
    stalled = bool(members) and (since >= stall_after or now - newest_update >= stall_after)
    by_round: dict[int, list[float]] = {}
    for record in members.values():
        for history_round, loss in record.loss_history:
            if math.isfinite(loss):
                by_round.setdefault(history_round, []).append(loss)
    curve = [[r, sum(losses) / len(losses)] for r, losses in sorted(by_round.items())][-MAX_CURVE_POINTS:]
    latest = [record.loss for record in active.values() if math.isfinite(record.loss)]
    hashes = {record.parameters_hash for record in members.values() if record.round == round_}
    if not members:
        alerts.append(alert("empty_run", "warning", f"run {name} has no members"))
    if stalled:
        alerts.append(
            alert(
                "stalled_run",
                "error",
                f"run {name} has not finished a round for {since:.0f}s (round {round_})",
            )
        )
    if len(hashes) > 1:
        alerts.append(
            alert(
                "hash_mismatch", "error", f"run {name}: members at round {round_} disagree on the parameters"
            )
        )
    state = {
        "name": clip_text(name),
        "round": round_,
        "members": len(active),
        "tokens_per_second": sum(finite(record.tokens_per_second) for record in active.values()),
        "bytes_per_round": sum(record.bytes_last_round for record in active.values()),
        "loss": sum(latest) / len(latest) if latest else None,
        "loss_curve": curve,
        "stalled": stalled,
        "seconds_since_progress": since,
        "hashes_agree": len(hashes) <= 1,
        "peers": [
            {
                "peer_id": clip_text(peer),
                "short_id": short_id(peer),
                "state": record.state.value,
                "round": record.round,
                "loss": record.loss if math.isfinite(record.loss) else None,
                "tokens_per_second": finite(record.tokens_per_second),
                "version": clip_text(record.version),
            }
            for peer, record in sorted(members.items())
        ],
    }
    return state, alerts

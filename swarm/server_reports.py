"""Signed misbehaviour reports: a client that caught a server computing wrong says so in the DHT.

Key layout: ``{swarm}.reports``, one per-peer record per *reporter* (the subkey is the
reporter's peer id), whose value is the list of that reporter's recent reports::

    [{"accused": peer id, "span": [start, end], "evidence": sha256 hex, "time": DHT time}, ...]

Every DHT record is signed by its owner (``swarm.signing``), and a peer can only write
under its own id, so a report cannot be forged in another peer's name: the reporter is
whoever signed it. A report is evidence shown to people (the health page counts each
server's distinct reporters), never a swarm-wide verdict: one client alone cannot get a
server banned anywhere but in its own ``BanList``.

Lifetime: every validator refuses records that live longer than its own ``--record-ttl``
(servers default to 60 s), so a report lives :data:`REPORT_TTL` seconds and is republished
with each new report of the same reporter (a client republishes its whole list).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from swarm.records import PeerValue, namespaced_key, read_field, read_wire_dict
from swarm.swarm_errors import MalformedRecord

logger = logging.getLogger(__name__)

REPORT_TTL = 55.0
"""Seconds a report lives: under the 60 s ``--record-ttl`` servers accept by default (clock skew margin)."""
MAX_REPORTS_PER_REPORTER = 32
"""Reports one reporter's record keeps (the newest); readers take no more either."""
MAX_REPORTERS = 4096
"""Reporters a reader takes (a hostile swarm must not make the page hold unbounded data)."""


def reports_key(swarm: str) -> str:
    """The key of the misbehaviour reports: ``{swarm}.reports``."""
    return namespaced_key(swarm, "reports")


@dataclasses.dataclass(frozen=True)
class MisbehaviourReport:
    """One server caught returning outputs that two other holders of its blocks disagree with.

    Attributes:
        accused: the server's peer id.
        span: the blocks ``(start, end)`` it computed wrong.
        evidence: sha256 (hex) over the compared inputs and the three outputs, so the
            reporter can later show what it compared.
        time: DHT time of the verdict.
    """

    accused: str
    span: tuple[int, int]
    evidence: str
    time: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "accused": self.accused,
            "span": list(self.span),
            "evidence": self.evidence,
            "time": self.time,
        }

    @classmethod
    def from_wire(cls, wire: Any) -> MisbehaviourReport:
        """Raises MalformedRecord when a field is missing or mistyped."""
        wire = read_wire_dict(wire, "report")
        span = read_field(wire, "span", (list, tuple), record="report")
        if len(span) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in span):
            raise MalformedRecord(f"report span must be two integers, got {span!r}")
        evidence = read_field(wire, "evidence", str, record="report")
        if len(evidence) != 64:
            raise MalformedRecord("report evidence must be a sha256 hex digest")
        return cls(
            accused=read_field(wire, "accused", str, record="report"),
            span=(span[0], span[1]),
            evidence=evidence,
            time=float(read_field(wire, "time", (int, float), record="report")),
        )


def parse_reports(wire: Any) -> list[MisbehaviourReport]:
    """One reporter's record -> its reports (malformed entries skipped, at most the cap)."""
    if not isinstance(wire, (list, tuple)):
        return []
    reports = []
    for item in list(wire)[:MAX_REPORTS_PER_REPORTER]:
        try:
            reports.append(MisbehaviourReport.from_wire(item))
        except MalformedRecord as error:
            logger.debug("skipping a malformed report: %s", error)
    return reports


def count_reporters(listing: Mapping[str, PeerValue]) -> dict[str, int]:
    """Accused peer id -> how many distinct reporters (signers) accuse it.

    A reporter counts once per accused server however many reports it filed, and a
    server's reports of itself are ignored: volume from one key proves nothing more.
    """
    accusers: dict[str, set[str]] = {}
    for reporter, item in list(listing.items())[:MAX_REPORTERS]:
        for report in parse_reports(item.value):
            if report.accused != reporter:
                accusers.setdefault(report.accused, set()).add(str(reporter))
    return {accused: len(reporters) for accused, reporters in accusers.items()}


class ReportBook:
    """The reports this peer filed, published as one signed record under its own id.

    Args:
        dht: a started ``SwarmDHT`` (signs with this peer's identity).
        timeout: seconds for one publication.
    """

    def __init__(self, dht, timeout: float):
        self.dht = dht
        self.timeout = timeout
        self.filed: list[MisbehaviourReport] = []

    async def file(self, report: MisbehaviourReport) -> None:
        """Adds ``report`` and republishes this peer's reports.

        Raises:
            SwarmError: the DHT store failed or ran past ``timeout`` (the report stays filed).
        """
        self.filed = [*self.filed, report][-MAX_REPORTS_PER_REPORTER:]
        await self.dht.publish(
            reports_key(self.dht.swarm_name),
            [item.to_wire() for item in self.filed],
            ttl=REPORT_TTL,
            timeout=self.timeout,
        )

    def accused(self) -> Iterable[str]:
        return [report.accused for report in self.filed]

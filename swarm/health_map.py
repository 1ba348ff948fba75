"""The swarm map part of the health snapshot: servers grouped by span into bands, and the coverage summary.

At 1,000 servers over 80 blocks a row per server does not read; the map aggregates.
Servers with the same span form a band (a row of the map); when there are more than
:data:`MAX_BANDS` distinct spans, spans are snapped to a coarser grid until they fit,
and such a band's ``cells`` say how many of its servers hold each block. The coverage
summary names the thinnest blocks (fewest online servers, then least tokens/s).
Pure functions over the snapshot's ``servers`` and ``model["blocks"]`` entries.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

MAX_BANDS = 40
"""Rows of the map at most (a 1000-server swarm has a few hundred distinct spans)."""
THINNEST = 5
"""Thinnest blocks listed in the coverage summary."""
THIN_RATIO = 0.75
"""A block with fewer online servers than this share of the median block's is called thin."""
STATES = ("online", "joining", "draining", "offline")


def _band_key(span: Sequence[int], grid: int) -> tuple[int, int]:
    return span[0] // grid, -(-span[1] // grid)


def build_bands(servers: Sequence[dict[str, Any]], n_blocks: int) -> list[dict[str, Any]]:
    """Groups servers into at most :data:`MAX_BANDS` bands, ordered by span.

    Args:
        servers: the snapshot's ``servers`` entries (``span``, ``state``, ``relayed``, ``reports``).
        n_blocks: blocks in the model (spans are clipped to it).

    Returns:
        ``[{"span", "exact", "servers", "states", "relayed", "reported", "cells", "members"}]``:
        ``exact`` is true when every member has exactly ``span``; ``states`` counts members
        per state; ``cells[i]`` counts members holding block ``span[0] + i``; ``members``
        are indices into ``servers``.
    """
    grid = 1
    while True:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, server in enumerate(servers):
            groups.setdefault(_band_key(server["span"], grid), []).append(index)
        if len(groups) <= MAX_BANDS or grid >= max(n_blocks, 1):
            break
        grid += 1
    bands = []
    for members in groups.values():
        spans = [servers[index]["span"] for index in members]
        start = max(0, min(span[0] for span in spans))
        end = min(max(n_blocks, start + 1), max(span[1] for span in spans))
        cells = [0] * max(end - start, 0)
        states = dict.fromkeys(STATES, 0)
        relayed = reported = 0
        for index in members:
            server = servers[index]
            states[server["state"]] = states.get(server["state"], 0) + 1
            relayed += server.get("relayed") is True
            reported += (server.get("reports") or 0) > 0
            for block in range(max(server["span"][0], start), min(server["span"][1], end)):
                cells[block - start] += 1
        bands.append(
            {
                "span": [start, end],
                "exact": len({tuple(span) for span in spans}) == 1,
                "servers": len(members),
                "states": states,
                "relayed": relayed,
                "reported": reported,
                "cells": cells,
                "members": members,
            }
        )
    bands.sort(key=lambda band: (band["span"][0], band["span"][1]))
    return bands


def coverage_summary(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Minimum, median and maximum coverage, the bottleneck, and the thinnest blocks.

    Args:
        blocks: the snapshot's ``model["blocks"]`` (online ``servers`` and ``throughput`` per block).

    Returns:
        ``{"min_servers", "median_servers", "max_servers", "bottleneck_tokens_per_second",
        "median_tokens_per_second", "thinnest": [{"index", "servers", "throughput", "thin"}]}``;
        the bottleneck is the least tokens/s of any block: what a chain through every
        block can push at most; ``thin`` marks a block below :data:`THIN_RATIO` of the
        median block's servers (an even swarm has none).
    """
    if not blocks:
        return {
            "min_servers": 0,
            "median_servers": 0,
            "max_servers": 0,
            "bottleneck_tokens_per_second": 0.0,
            "median_tokens_per_second": 0.0,
            "thinnest": [],
        }
    counts = [block["servers"] for block in blocks]
    throughput = [block["throughput"] for block in blocks]
    thinnest = sorted(blocks, key=lambda block: (block["servers"], block["throughput"], block["index"]))
    median = statistics.median(counts)
    return {
        "min_servers": min(counts),
        "median_servers": median,
        "max_servers": max(counts),
        "bottleneck_tokens_per_second": min(throughput),
        "median_tokens_per_second": statistics.median(throughput),
        "thinnest": [
            {
                "index": block["index"],
                "servers": block["servers"],
                "throughput": block["throughput"],
                "thin": block["servers"] < THIN_RATIO * median,
            }
            for block in thinnest[:THINNEST]
        ],
    }

"""The swarm map of the health page: bands of servers over blocks, the coverage strip, the server rows.

Drawn from ``/api/state``'s ``map``, ``coverage`` and ``servers`` entries as inline SVG
and one HTML table, sized for 1,000 servers over 80 blocks:

- the map has one row per band (servers grouped by span, ``swarm.health_map``), each
  row split by state (online, joining, draining, offline), with the band's count and its
  relayed / reported marks; cells a coarse band's members do not all hold are paler;
- the coverage strip has one cell per block for online servers and for tokens/s, each
  colored by its ratio to the median block and with a bar scaled from zero to the
  largest, so an even swarm reads flat and a thin block stands out; the thinnest blocks
  are outlined and named;
- the server table groups rows by band, collapsed at scale; the page's script expands
  a band and finds a peer.
Every value from the DHT passes through ``_text`` (``html.escape``).
"""

from __future__ import annotations

import html
import math
import statistics
from typing import Any

STATE_COLORS = {"online": "#2e7d32", "joining": "#1565c0", "draining": "#ef6c00", "offline": "#9e9e9e"}
UNCOVERED = "#c62828"
_LABEL_WIDTH = 64
_COUNT_WIDTH = 70
_ROW = 13
_MAP_WIDTH = 880
_STRIP_ROW = 16
_BAR_HEIGHT = 44
OPEN_BANDS_UP_TO = 40
"""Swarms with at most this many servers show every band's rows expanded."""


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}"


def _blocks_label(span: list[int]) -> str:
    start, end = span
    return str(start) if end - start == 1 else f"{start}–{end - 1}"


def _ratio_color(ratio: float) -> str:
    """Green at the median block, paler then orange then red as a block thins out."""
    if ratio >= 0.85:
        return "#2e7d32"
    if ratio >= 0.6:
        return "#7cb342"
    if ratio >= 0.35:
        return "#f9a825"
    return "#ef6c00"


def _cell_width(n_blocks: int) -> float:
    return max(3.0, min(16.0, (_MAP_WIDTH - _LABEL_WIDTH - _COUNT_WIDTH) / max(n_blocks, 1)))


def _axis(n_blocks: int, cell: float, y: float) -> str:
    step = max(1, round(n_blocks / 16 / 5) * 5) if n_blocks > 20 else 1
    return "".join(
        f'<text x="{_LABEL_WIDTH + block * cell + 1:.1f}" y="{y:.1f}" font-size="9" fill="#555">{block}</text>'
        for block in range(0, n_blocks, step)
    )


def _state_summary(states: dict[str, int]) -> str:
    return ", ".join(f"{count} {state}" for state, count in states.items() if count)


def render_map(state: dict[str, Any]) -> str:
    """The bands-over-blocks SVG (or a note when there is nothing to draw)."""
    model, bands = state["model"], state["map"]
    n_blocks = model["n_blocks"] if model is not None else max((b["span"][1] for b in bands), default=0)
    if not bands or n_blocks <= 0:
        return '<p class="muted" id="swarm-map">no servers announced</p>'
    cell = _cell_width(n_blocks)
    width = _LABEL_WIDTH + n_blocks * cell + _COUNT_WIDTH
    height = 14 + len(bands) * _ROW + 4
    parts = [
        f'<svg id="swarm-map" class="swarm-map" role="img" aria-label="servers by span over blocks" '
        f'width="{width:.0f}" height="{height}" viewBox="0 0 {width:.0f} {height}">',
        _axis(n_blocks, cell, 10),
    ]
    for index, band in enumerate(bands):
        start, end = band["span"]
        y = 14 + index * _ROW
        x0 = _LABEL_WIDTH + start * cell
        total = max(band["servers"], 1)
        label = ("" if band["exact"] else "≈") + f"{start}:{end}"
        marks = []
        if band["relayed"]:
            marks.append(f"⇄{band['relayed']}")
        if band["reported"]:
            marks.append(f"⚑{band['reported']}")
        title = f"blocks {_blocks_label(band['span'])}: {band['servers']} servers ({_state_summary(band['states'])})"
        if marks:
            title += f", {band['relayed']} relayed, {band['reported']} reported"
        parts.append(
            f'<g class="band" data-band="{index}" data-span="{start}:{end}"><title>{_text(title)}</title>'
            f'<text x="2" y="{y + 10}" font-size="10">{_text(label)}</text>'
        )
        offset = 0.0
        for name, color in STATE_COLORS.items():
            count = band["states"].get(name, 0)
            if not count:
                continue
            stripe = (_ROW - 2) * count / total
            parts.append(
                f'<rect class="state-{name}" x="{x0:.1f}" y="{y + offset:.1f}" width="{(end - start) * cell:.1f}" '
                f'height="{stripe:.2f}" fill="{color}"/>'
            )
            offset += stripe
        if not band["exact"]:
            for block, count in enumerate(band["cells"]):
                if count < band["servers"]:
                    parts.append(
                        f'<rect x="{x0 + block * cell:.1f}" y="{y}" width="{cell:.1f}" height="{_ROW - 2}" '
                        f'fill="#fff" fill-opacity="{0.8 * (1 - count / total):.2f}"/>'
                    )
        parts.append(
            f'<text x="{_LABEL_WIDTH + n_blocks * cell + 4:.1f}" y="{y + 10}" font-size="10">'
            f"{band['servers']}{(' ' + ' '.join(marks)) if marks else ''}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def render_coverage_strip(model: dict[str, Any], coverage: dict[str, Any], min_redundancy: int = 2) -> str:
    """Per block: online servers and tokens/s, colored by their ratio to the median block."""
    blocks = model["blocks"]
    if not blocks:
        return '<p class="muted">no blocks</p>'
    n_blocks = len(blocks)
    cell = _cell_width(n_blocks)
    width = _LABEL_WIDTH + n_blocks * cell + _COUNT_WIDTH
    height = _BAR_HEIGHT + 2 * _STRIP_ROW + 18
    median_servers = max(statistics.median(b["servers"] for b in blocks), 1e-9)
    median_tokens = max(statistics.median(b["throughput"] for b in blocks), 1e-9)
    most = max(1, *(b["servers"] for b in blocks))
    thin = [item for item in coverage["thinnest"] if item["thin"]]
    thinnest = {item["index"] for item in (thin or coverage["thinnest"][:3])}
    parts = [
        f'<svg class="coverage-chart" role="img" aria-label="coverage per block" width="{width:.0f}" '
        f'height="{height}" viewBox="0 0 {width:.0f} {height}">',
        f'<text x="2" y="{_BAR_HEIGHT - 2}" font-size="10">servers</text>',
        f'<text x="2" y="{_BAR_HEIGHT + _STRIP_ROW - 4}" font-size="10">online</text>',
        f'<text x="2" y="{_BAR_HEIGHT + 2 * _STRIP_ROW - 4}" font-size="10">tokens/s</text>',
    ]
    for block in blocks:
        index, servers, tokens = block["index"], block["servers"], block["throughput"]
        x = _LABEL_WIDTH + index * cell
        title = f"block {index}: {servers} online server(s), {_number(tokens)} tokens/s"
        bar = _BAR_HEIGHT * servers / most
        parts.append(
            f'<rect x="{x:.1f}" y="{_BAR_HEIGHT - bar:.1f}" width="{max(cell - 1, 1):.1f}" height="{bar:.1f}" '
            f'fill="#90a4ae"><title>{_text(title)}</title></rect>'
        )
        fill = UNCOVERED if not block["covered"] else _ratio_color(servers / median_servers)
        state = "uncovered" if not block["covered"] else "covered"
        thin = " thinnest" if index in thinnest else ""
        stroke = ' stroke="#000" stroke-width="1.5"' if thin else ""
        parts.append(
            f'<rect class="block {state}{thin}" data-block="{index}" data-servers="{servers}" x="{x:.1f}" '
            f'y="{_BAR_HEIGHT + 2}" width="{max(cell - 1, 1):.1f}" height="{_STRIP_ROW - 3}" fill="{fill}"{stroke}>'
            f"<title>{_text(title)}</title></rect>"
        )
        token_fill = UNCOVERED if not block["covered"] else _ratio_color(tokens / median_tokens)
        parts.append(
            f'<rect x="{x:.1f}" y="{_BAR_HEIGHT + _STRIP_ROW + 2}" width="{max(cell - 1, 1):.1f}" '
            f'height="{_STRIP_ROW - 3}" fill="{token_fill}"><title>{_text(title)}</title></rect>'
        )
    for value, label in ((median_servers, "median"), (min_redundancy, "min")):
        y = _BAR_HEIGHT - _BAR_HEIGHT * min(value, most) / most
        parts.append(
            f'<line x1="{_LABEL_WIDTH}" x2="{_LABEL_WIDTH + n_blocks * cell:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#37474f" stroke-dasharray="3,3" stroke-width="0.8"/>'
            f'<text x="{_LABEL_WIDTH + n_blocks * cell + 4:.1f}" y="{y + 3:.1f}" font-size="9">{label} {_number(value, 0)}</text>'
        )
    parts.append(_axis(n_blocks, cell, height - 2))
    parts.append("</svg>")
    return "".join(parts)


def render_thinnest(coverage: dict[str, Any]) -> str:
    """The sentence that names the thin blocks (or says that none is, and which are thinnest)."""
    if not coverage["thinnest"]:
        return ""
    thin = [item for item in coverage["thinnest"] if item["thin"]]
    items = ", ".join(
        f'<b class="thin-block" data-block="{item["index"]}">block {item["index"]}</b> '
        f"({item['servers']} servers, {_number(item['throughput'], 0)} tokens/s)"
        for item in (thin or coverage["thinnest"][:3])
    )
    lead = "Thin blocks" if thin else "No block is below 75% of the median; the thinnest"
    return (
        f'<p id="thinnest">{lead}: {items}. Median block: {_number(coverage["median_servers"], 0)} servers, '
        f"{_number(coverage['median_tokens_per_second'], 0)} tokens/s; end-to-end bottleneck "
        f"{_number(coverage['bottleneck_tokens_per_second'], 0)} tokens/s.</p>"
    )


def _relayed_mark(server: dict[str, Any]) -> str:
    """A mark after the state of a server the reachability check found behind NAT (issue #13)."""
    if server.get("reachability") != "relayed":
        return ""
    reason = _text(server.get("reachability_reason", ""))
    return (
        f' <span class="muted relayed" title="behind NAT, reached through a relay: {reason}">(relayed)</span>'
    )


def _server_row(server: dict[str, Any]) -> str:
    rtts = sorted(server["rtts"].values())
    rtt = f"{len(rtts)} · {_number(statistics.median(rtts) * 1000, 0)} ms" if rtts else "–"
    marks = []
    if server.get("relayed") and server.get("reachability") != "relayed":  # a plain flag, no check verdict
        marks.append("relayed")
    if server.get("reports"):
        marks.append(f"⚑ {server['reports']} reports")
    version_class = ' class="stale"' if server["stale_version"] else ""
    uptime = server["uptime"]
    uptime_text = "–" if uptime is None else f"{int(uptime) // 3600}h {int(uptime) % 3600 // 60}m"
    return (
        f'<tr class="member" data-peer="{_text(server["peer_id"])}" data-state="{_text(server["state"])}" '
        f'data-reachability="{_text(server.get("reachability", "unknown"))}">'
        f"<td><code>{_text(server['short_id'])}</code></td>"
        f'<td class="s-{_text(server["state"])}">{_text(server["state"])}{_relayed_mark(server)}</td>'
        f"<td{version_class}>{_text(server['version'])}</td>"
        f"<td>{_text(server['device'])} {_text(server['dtype'])}</td>"
        f"<td>{server['span'][0]}:{server['span'][1]}</td><td>{_number(server['throughput'])}</td>"
        f"<td>{server['free_cache_tokens']:,}</td><td>{server['load']}</td><td>{rtt}</td>"
        f"<td>{uptime_text}</td><td>{_text(' '.join(marks) or server['source'])}</td></tr>"
    )


def render_servers(state: dict[str, Any]) -> str:
    """The server rows, grouped by band (collapsed above :data:`OPEN_BANDS_UP_TO` servers)."""
    servers, bands = state["servers"], state["map"]
    if not servers:
        return '<section><h2>Servers</h2><table id="servers"><tbody><tr><td>no servers</td></tr></tbody></table></section>'
    open_class = " open" if len(servers) <= OPEN_BANDS_UP_TO else ""
    groups = []
    for index, band in enumerate(bands):
        start, end = band["span"]
        head = (
            f'<tr class="band-head"><td colspan="11"><button type="button" class="toggle">'
            f"blocks {_blocks_label(band['span'])}{'' if band['exact'] else ' (spans near)'} · "
            f"{band['servers']} servers · {_text(_state_summary(band['states']))}</button></td></tr>"
        )
        rows = "".join(_server_row(servers[member]) for member in band["members"])
        groups.append(
            f'<tbody class="band-rows{open_class}" data-band="{index}" data-span="{start}:{end}">{head}{rows}</tbody>'
        )
    return (
        f'<section><h2>Servers <span class="muted">({len(servers)}; click a band to expand)</span></h2>'
        '<table id="servers"><thead><tr><th>peer</th><th>state</th><th>version</th><th>device / dtype</th>'
        "<th>span</th><th>tokens/s</th><th>free cache</th><th>load</th><th>next hops · rtt</th><th>uptime</th>"
        f"<th>marks / source</th></tr></thead>{''.join(groups)}</table></section>"
    )

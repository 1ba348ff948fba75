"""The health page: server-rendered HTML and inline SVG from the ``/api/state`` document.

No frontend build step and no client-side templating: the page's small script fetches
``/fragment`` (this module's ``render_fragment``) and swaps it in, so all escaping
happens here, once, with ``html.escape``. Every value from the DHT passes through
``_text`` before it reaches markup.
"""

from __future__ import annotations

import html
import math
from typing import Any

_CHART_WIDTH = 720
_CHART_HEIGHT = 120
_LOSS_WIDTH = 360
_LOSS_HEIGHT = 120

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem} h2{font-size:1.15rem;margin-top:1.6rem}
table{border-collapse:collapse;font-size:.85rem} td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
th{background:#eee} .verdict{font-weight:bold;padding:.1rem .5rem;border-radius:.3rem;color:#fff}
.healthy{background:#2e7d32} .degraded{background:#ef6c00} .broken{background:#c62828}
.alerts li.error{color:#c62828} .alerts li.warning{color:#ef6c00} .stale{color:#ef6c00;font-weight:bold}
.muted{color:#777;font-size:.8rem} svg{background:#fff;border:1px solid #ddd}
"""

_SCRIPT = """
(function () {
  const content = document.getElementById("content");
  const status = document.getElementById("refresh-status");
  const interval = Number(document.body.dataset.pollMs) || 2000;
  async function refresh() {
    try {
      const response = await fetch("fragment", {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      content.innerHTML = await response.text();
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      status.textContent = "update failed: " + error.message;
    } finally {
      setTimeout(refresh, interval);
    }
  }
  setTimeout(refresh, interval);
})();
"""


def _text(value: Any) -> str:
    """Escapes anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "–"
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 60}m {seconds % 60}s"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return "–"  # pragma: no cover


def render_coverage_chart(model: dict[str, Any]) -> str:
    """One bar pair per block: servers (green) and throughput (blue); uncovered blocks red."""
    blocks = model["blocks"]
    if not blocks:
        return '<p class="muted">no blocks</p>'
    width = _CHART_WIDTH / len(blocks)
    most_servers = max(1, *(block["servers"] for block in blocks))
    most_throughput = max(1e-9, *(block["throughput"] for block in blocks))
    parts = [
        f'<svg class="coverage-chart" role="img" aria-label="coverage per block" width="{_CHART_WIDTH}" '
        f'height="{_CHART_HEIGHT + 16}" viewBox="0 0 {_CHART_WIDTH} {_CHART_HEIGHT + 16}">'
    ]
    for block in blocks:
        x = block["index"] * width
        title = (
            f"block {block['index']}: {block['servers']} server(s), {_number(block['throughput'])} tokens/s"
        )
        if not block["covered"]:
            parts.append(
                f'<rect class="block uncovered" data-block="{block["index"]}" x="{x:.2f}" y="0" '
                f'width="{max(width - 1, 0.5):.2f}" height="{_CHART_HEIGHT}" fill="#c62828">'
                f"<title>{_text(title)} (uncovered)</title></rect>"
            )
            continue
        servers_height = _CHART_HEIGHT * block["servers"] / most_servers
        throughput_height = _CHART_HEIGHT * block["throughput"] / most_throughput
        half = max(width / 2 - 0.5, 0.25)
        parts.append(
            f'<g class="block covered" data-block="{block["index"]}"><title>{_text(title)}</title>'
            f'<rect x="{x:.2f}" y="{_CHART_HEIGHT - servers_height:.2f}" width="{half:.2f}" '
            f'height="{servers_height:.2f}" fill="#2e7d32"/>'
            f'<rect x="{x + half:.2f}" y="{_CHART_HEIGHT - throughput_height:.2f}" width="{half:.2f}" '
            f'height="{throughput_height:.2f}" fill="#1565c0"/></g>'
        )
    step = max(1, len(blocks) // 16)
    for block in blocks[::step]:
        parts.append(
            f'<text x="{block["index"] * width + 1:.2f}" y="{_CHART_HEIGHT + 12}" font-size="10">{block["index"]}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_loss_chart(curve: list[list[float]]) -> str:
    """The run's mean loss per round as an SVG polyline."""
    points = [(r, loss) for r, loss in curve if isinstance(loss, (int, float)) and math.isfinite(loss)]
    header = (
        f'<svg class="loss-chart" role="img" aria-label="loss per round" width="{_LOSS_WIDTH}" '
        f'height="{_LOSS_HEIGHT}" viewBox="0 0 {_LOSS_WIDTH} {_LOSS_HEIGHT}">'
    )
    if not points:
        return header + '<text x="8" y="20" font-size="12">no loss reported yet</text></svg>'
    rounds = [r for r, _ in points]
    losses = [loss for _, loss in points]
    low, high = min(losses), max(losses)
    first, last = min(rounds), max(rounds)
    pad = 8

    def x(r: float) -> float:
        return pad + (r - first) / max(last - first, 1) * (_LOSS_WIDTH - 2 * pad)

    def y(loss: float) -> float:
        return pad + (high - loss) / max(high - low, 1e-12) * (_LOSS_HEIGHT - 2 * pad - 12)

    polyline = " ".join(f"{x(r):.1f},{y(loss):.1f}" for r, loss in points)
    return (
        header
        + f'<polyline fill="none" stroke="#1565c0" stroke-width="2" points="{polyline}"/>'
        + f'<text x="{pad}" y="{_LOSS_HEIGHT - 4}" font-size="10">rounds {first}–{last}, '
        + f"loss {_number(high, 3)} → {_number(losses[-1], 3)}</text></svg>"
    )


def _render_model(model: dict[str, Any] | None) -> str:
    if model is None:
        return '<section id="model"><h2>Model</h2><p><span class="verdict broken">broken</span> no model announced</p></section>'
    return (
        '<section id="model">'
        f"<h2>Model {_text(model['model_id'])} <span class='muted'>({model['n_blocks']} blocks)</span></h2>"
        f'<p><span class="verdict {_text(model["verdict"])}" id="model-verdict">{_text(model["verdict"])}</span> '
        f"{_text(model['reason'])}</p>"
        f"{render_coverage_chart(model)}"
        '<p class="muted">green: online servers per block; blue: tokens/s per block; red: no online server</p>'
        "</section>"
    )


def _relayed_mark(server: dict) -> str:
    """A small mark after the state of a server reached through relays (issue #13)."""
    if server.get("reachability") != "relayed":
        return ""
    reason = _text(server.get("reachability_reason", ""))
    return (
        f' <span class="muted relayed" title="behind NAT, reached through a relay: {reason}">(relayed)</span>'
    )


def _render_servers(servers: list[dict[str, Any]]) -> str:
    rows = []
    for server in servers:
        rtts = ", ".join(
            f"{_text(peer)}: {_number(rtt * 1000, 0)} ms" for peer, rtt in server["rtts"].items()
        )
        version_class = ' class="stale"' if server["stale_version"] else ""
        rows.append(
            f'<tr data-peer="{_text(server["peer_id"])}" data-state="{_text(server["state"])}" '
            f'data-reachability="{_text(server.get("reachability", "unknown"))}">'
            f'<td title="{_text(server["peer_id"])}"><code>{_text(server["short_id"])}</code></td>'
            f"<td>{_text(server['state'])}{_relayed_mark(server)}</td>"
            f"<td{version_class}>{_text(server['version'])}</td>"
            f"<td>{_text(server['device'])} {_text(server['dtype'])}</td>"
            f"<td>{server['span'][0]}:{server['span'][1]}</td>"
            f"<td>{_number(server['throughput'])}</td>"
            f"<td>{server['free_cache_tokens']:,}</td>"
            f"<td>{server['load']}</td>"
            f"<td>{rtts or '–'}</td>"
            f"<td>{_duration(server['uptime'])}</td>"
            f"<td>{_text(server['source'])}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="11">no servers</td></tr>'
    return (
        '<section><h2>Servers</h2><table id="servers"><thead><tr><th>peer</th><th>state</th><th>version</th>'
        "<th>device / dtype</th><th>span</th><th>tokens/s</th><th>free cache</th><th>load</th>"
        f"<th>round-trip times</th><th>uptime</th><th>source</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def _render_runs(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return (
            '<section id="runs"><h2>Training runs</h2><p class="muted">no training runs found</p></section>'
        )
    parts = ['<section id="runs"><h2>Training runs</h2>']
    for run in runs:
        verdict = "broken" if run["stalled"] or not run["hashes_agree"] else "healthy"
        label = (
            "stalled" if run["stalled"] else ("hash mismatch" if not run["hashes_agree"] else "progressing")
        )
        parts.append(
            f'<div class="run" data-run="{_text(run["name"])}"><h3>{_text(run["name"])} '
            f'<span class="verdict {verdict}">{label}</span></h3>'
            "<table><tr><th>round</th><th>members</th><th>tokens/s</th><th>bytes per round</th><th>loss</th></tr>"
            f"<tr><td>{run['round']}</td><td>{run['members']}</td><td>{_number(run['tokens_per_second'])}</td>"
            f"<td>{_bytes(run['bytes_per_round'])}</td><td>{_number(run['loss'], 4)}</td></tr></table>"
            f"{render_loss_chart(run['loss_curve'])}</div>"
        )
    parts.append("</section>")
    return "".join(parts)


def _render_alerts(alerts: list[dict[str, str]]) -> str:
    if not alerts:
        return '<section><h2>Alerts</h2><p id="alerts" class="muted">none</p></section>'
    items = "".join(
        f'<li class="{_text(alert["severity"])}" data-kind="{_text(alert["kind"])}">{_text(alert["message"])}</li>'
        for alert in alerts
    )
    return f'<section><h2>Alerts</h2><ul id="alerts" class="alerts">{items}</ul></section>'


def render_fragment(state: dict[str, Any]) -> str:
    """The live part of the page (what ``/fragment`` returns and the script swaps in)."""
    sources = state["sources"]
    mqtt = "off"
    if sources.get("mqtt"):
        mqtt = f"{'connected' if sources.get('mqtt_connected') else 'disconnected'}, {sources.get('mqtt_peers', 0)} peers"
    return (
        f"<p>Swarm <b>{_text(state['swarm'])}</b>: "
        f'<span class="verdict {_text(state["verdict"])}" id="verdict">{_text(state["verdict"])}</span> '
        f'<span class="muted">DHT {"ok" if not sources.get("dht_error") else "unreachable"} · MQTT {_text(mqtt)}</span></p>'
        + _render_alerts(state["alerts"])
        + _render_model(state["model"])
        + _render_servers(state["servers"])
        + _render_runs(state["runs"])
    )


def render_page(state: dict[str, Any], *, poll_interval: float) -> str:
    """The whole page: the fragment plus the refresh script.

    Args:
        state: the ``/api/state`` document.
        poll_interval: seconds between the script's refreshes.
    """
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Swarm health: {_text(state['swarm'])}</title><style>{_STYLE}</style></head>"
        f'<body data-poll-ms="{int(poll_interval * 1000)}"><h1>Swarm health</h1>'
        f'<main id="content">{render_fragment(state)}</main>'
        '<p class="muted"><span id="refresh-status">live</span> · '
        '<a href="api/state">/api/state</a> · <a href="metrics">/metrics</a></p>'
        f"<script>{_SCRIPT}</script></body></html>"
    )

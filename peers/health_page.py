"""The health page: server-rendered HTML and inline SVG from the ``/api/state`` document.

No frontend build step, no CDN and no client-side templating (the page works offline):
the page's small script fetches ``/fragment`` (this module's ``render_fragment``) and
swaps it in, keeping the bands a person opened and the peer they searched for; all
escaping happens on the server, once, with ``html.escape``. Every value from the DHT
passes through ``_text`` before it reaches markup. The swarm map and server rows are
drawn by ``peers.health_page_map``, the history charts by ``peers.health_page_charts``.
"""

from __future__ import annotations

import html
import math
from typing import Any

from peers.health_page_charts import render_history, render_run_history
from peers.health_page_map import (
    STATE_COLORS,
    render_coverage_strip,
    render_map,
    render_servers,
    render_thinnest,
)

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
.charts{display:flex;flex-wrap:wrap;gap:.6rem} figure.history{margin:0} figcaption{font-size:.75rem;color:#444}
tbody.band-rows:not(.open) tr.member{display:none} tr.band-head button{all:unset;cursor:pointer;font-size:.8rem}
tr.band-head td{background:#f3f3f3} tr.hit td{background:#fff59d} g.band.hit rect{stroke:#000;stroke-width:1.5}
.legend span{display:inline-block;width:.8rem;height:.8rem;margin:0 .2rem 0 .6rem;vertical-align:middle}
#peer-search{width:22rem;padding:.2rem} .share{display:inline-block;height:.6rem;background:#1565c0}
"""

_SCRIPT = """
(function () {
  const content = document.getElementById("content");
  const status = document.getElementById("refresh-status");
  const search = document.getElementById("peer-search");
  const result = document.getElementById("search-result");
  const interval = Number(document.body.dataset.pollMs) || 2000;
  const opened = new Set();
  content.addEventListener("click", (event) => {
    const button = event.target.closest("tr.band-head button");
    if (!button) return;
    const body = button.closest("tbody");
    body.classList.toggle("open");
    if (body.classList.contains("open")) opened.add(body.dataset.span); else opened.delete(body.dataset.span);
  });
  function find() {
    content.querySelectorAll(".hit").forEach((node) => node.classList.remove("hit"));
    const query = search.value.trim().toLowerCase();
    if (query.length < 2) { result.textContent = ""; return; }
    const rows = [...content.querySelectorAll("tr.member")].filter((row) => row.dataset.peer.toLowerCase().includes(query));
    if (!rows.length) { result.textContent = "no peer matches " + query; return; }
    const row = rows[0], body = row.closest("tbody");
    body.classList.add("open");
    row.classList.add("hit");
    const band = content.querySelector('g.band[data-span="' + body.dataset.span + '"]');
    if (band) band.classList.add("hit");
    const cells = row.querySelectorAll("td");
    result.textContent = row.dataset.peer + ": " + row.dataset.state + ", blocks " + cells[4].textContent +
      (rows.length > 1 ? " (" + rows.length + " matches, first shown)" : "");
  }
  search.addEventListener("input", () => { find(); const hit = content.querySelector("tr.hit"); if (hit) hit.scrollIntoView({block: "center"}); });
  async function refresh() {
    try {
      const response = await fetch("fragment", {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      content.innerHTML = await response.text();
      content.querySelectorAll("tbody.band-rows").forEach((body) => { if (opened.has(body.dataset.span)) body.classList.add("open"); });
      find();
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


def _legend() -> str:
    return (
        '<p class="legend muted">'
        + "".join(f'<span style="background:{color}"></span>{name}' for name, color in STATE_COLORS.items())
        + " · ⇄ relayed · ⚑ reported</p>"
    )


def _render_model(state: dict[str, Any]) -> str:
    model = state["model"]
    if model is None:
        return (
            '<section id="model"><h2>Model</h2><p><span class="verdict broken">broken</span> no model announced</p>'
            + render_map(state)
            + "</section>"
        )
    coverage = state["coverage"]
    return (
        '<section id="model">'
        f"<h2>Model {_text(model['model_id'])} <span class='muted'>({model['n_blocks']} blocks, "
        f"{len(state['servers'])} servers)</span></h2>"
        f'<p><span class="verdict {_text(model["verdict"])}" id="model-verdict">{_text(model["verdict"])}</span> '
        f"{_text(model['reason'])}</p>"
        "<h3>Swarm map <span class='muted'>(rows: servers grouped by span; count and marks at the right)</span></h3>"
        f"{render_map(state)}{_legend()}"
        "<h3>Coverage per block</h3>"
        f"{render_coverage_strip(model, coverage, coverage.get('min_redundancy', 2))}"
        '<p class="muted">bars: online servers (0 to the largest block); cells: online servers and tokens/s '
        "against the median block (green: at the median, yellow/orange: thinner, red: no online server); "
        "outlined: the thinnest blocks</p>"
        f"{render_thinnest(coverage)}"
        "</section>"
    )


_MAX_MEMBER_ROWS = 64


def _render_members(peers: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr data-member="{_text(peer["peer_id"])}"><td><code>{_text(peer["short_id"])}</code></td>'
        f"<td>{_text(peer['state'])}</td><td>{peer['round']}</td><td>{_number(peer['loss'], 4)}</td>"
        f"<td>{_number(peer['tokens_per_second'])}</td><td>"
        f'<span class="share" style="width:{4 * peer.get("tokens_share", 0.0):.2f}rem"></span> '
        f"{100 * peer.get('tokens_share', 0.0):.1f}%</td></tr>"
        for peer in sorted(peers, key=lambda peer: -peer.get("tokens_share", 0.0))[:_MAX_MEMBER_ROWS]
    )
    more = len(peers) - _MAX_MEMBER_ROWS
    return (
        '<table class="members"><tr><th>member</th><th>state</th><th>round</th><th>loss</th><th>tokens/s</th>'
        "<th>share of tokens/s</th></tr>"
        f"{rows}{f'<tr><td colspan=6>… {more} more</td></tr>' if more > 0 else ''}</table>"
        '<p class="muted">share: of the run\'s tokens/s, what a member adds to a time-window round '
        "(records carry no per-round sample counts)</p>"
    )


def _render_runs(runs: list[dict[str, Any]], history: dict[str, Any]) -> str:
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
            f"{render_loss_chart(run['loss_curve'])}{render_run_history(history, run['name'])}"
            f"{_render_members(run['peers'])}</div>"
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


def _render_limits(limits: dict[str, Any]) -> str:
    dropped = limits.get("records_dropped", 0)
    if not dropped:
        return ""
    return f'<p class="muted" id="limits">{dropped} DHT records left out (over the reader\'s caps)</p>'


def render_fragment(state: dict[str, Any]) -> str:
    """The live part of the page (what ``/fragment`` returns and the script swaps in)."""
    sources = state["sources"]
    mqtt = "off"
    if sources.get("mqtt"):
        mqtt = f"{'connected' if sources.get('mqtt_connected') else 'disconnected'}, {sources.get('mqtt_peers', 0)} peers"
        rejected = {cause: count for cause, count in (sources.get("mqtt_rejected") or {}).items() if count}
        if rejected:  # forged, replayed, stale or malformed messages the feed dropped (issue #14)
            mqtt += ", dropped " + ", ".join(f"{count} {cause}" for cause, count in sorted(rejected.items()))
    return (
        f"<p>Swarm <b>{_text(state['swarm'])}</b>: "
        f'<span class="verdict {_text(state["verdict"])}" id="verdict">{_text(state["verdict"])}</span> '
        f'<span class="muted">DHT {"ok" if not sources.get("dht_error") else "unreachable"} · MQTT {_text(mqtt)}</span></p>'
        + _render_alerts(state["alerts"])
        + _render_model(state)
        + render_history(state.get("history") or {})
        + render_servers(state)
        + _render_runs(state["runs"], state.get("history") or {})
        + _render_limits(state.get("limits") or {})
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
        '<p><input id="peer-search" type="search" placeholder="find a peer: id or prefix" '
        'aria-label="find a peer" autocomplete="off"> <span id="search-result" class="muted"></span></p>'
        f'<main id="content">{render_fragment(state)}</main>'
        '<p class="muted"><span id="refresh-status">live</span> · '
        '<a href="api/state">/api/state</a> · <a href="metrics">/metrics</a></p>'
        f"<script>{_SCRIPT}</script></body></html>"
    )

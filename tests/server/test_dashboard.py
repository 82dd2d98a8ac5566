"""The Grafana dashboard: a datasource variable, an instance selector on every query, rate windows of
$__rate_interval, the host-device link capacity as a reference line, and every metric it plots exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from zostream.engine.metrics import DOCS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "zostream.json"


def _panels(ps):
    for p in ps:
        yield p
        yield from _panels(p.get("panels", []))


def test_dashboard_is_portable_and_selects_instances() -> None:
    d = json.loads(DASHBOARD.read_text())
    names = {v["name"]: v for v in d["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    assert names["instance"]["includeAll"] and "zostream_engine_up" in names["instance"]["definition"]
    exprs = []
    for p in _panels(d["panels"]):
        if p.get("type") == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            exprs.append(t["expr"])
    assert exprs
    for e in exprs:
        assert not re.search(r"\[\d+[smh]\]", e), e  # fixed windows break at other scrape intervals
        for m in re.finditer(r"(zostream_\w+)(\{[^}]*\})?", e):
            assert m.group(2) and 'instance=~"$instance"' in m.group(2), e
            base = re.sub(r"_(bucket|count|sum)$", "", m.group(1))
            assert base in DOCS or m.group(1) in DOCS, f"unknown metric {m.group(1)}"
    assert any("vector($link_bytes_per_second)" in e for e in exprs)  # the link capacity line
    assert any("inter_token_latency" in e for e in exprs) and any(
        "requests_rejected_total" in e for e in exprs
    )

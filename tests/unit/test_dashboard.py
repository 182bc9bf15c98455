"""The dashboard as code: the shipped JSON is the generator's output, and it only asks
Prometheus for metrics the router exposes."""

from __future__ import annotations

import json
import re

from dashboards import generate
from router.metrics import Metrics

ROOT = generate.ROOT


def _exposed_names() -> set[str]:
    """Every sample name the router's registry can expose (with _total, _bucket, ...)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def test_chart_file_is_the_generator_output() -> None:
    """helm/failover-router/files/dashboard.json equals `python -m dashboards.generate`."""
    assert generate.CHART_FILE.read_text(encoding="utf-8") == generate.render()


def test_dashboards_dir_links_to_the_chart_file() -> None:
    """dashboards/failover-router.json (for a manual import) is the chart's file."""
    link = ROOT / "dashboards" / "failover-router.json"
    assert link.is_symlink()
    assert link.resolve() == generate.CHART_FILE.resolve()


def test_every_query_uses_only_metrics_the_router_exposes() -> None:
    """No query of a panel, variable or annotation names a frouter_ metric the router does
    not have (a dashboard must not promise data that cannot exist)."""
    exposed = _exposed_names()
    for query in generate.queries(generate.build()):
        for name in re.findall(r"\bfrouter_[a-z_]+", query.expr):
            assert name in exposed, f"{query.where}: {name} is not exposed by router/metrics.py"


def test_every_query_filters_on_the_datacenter() -> None:
    """Each query is scoped to the selected datacenter(s), except the variable listing them."""
    for query in generate.queries(generate.build()):
        if query.where == "variable datacenter":
            continue
        assert 'datacenter=~"$datacenter"' in query.expr, query.where


def test_panels_cover_the_failover_view() -> None:
    """The panels a person watching a failover needs are there, each with queries."""
    dash = generate.build()
    titles = {p["title"] for p in dash["panels"] if p["type"] != "row"}
    for needed in (
        "Active cluster per route",
        "Cluster health verdict",
        "Verdict source and Consul leader",
        "Lag per route and cluster (messages)",
        "Lag per route and cluster (seconds)",
        "Points written per cluster",
        "Write latency (p50, p99)",
        "Dead letters",
        "Retention loss and skipped ranges (messages)",
    ):
        assert needed in titles
    assert all(p["targets"] for p in dash["panels"] if p["type"] != "row")
    assert {a["name"] for a in dash["annotations"]["list"]} >= {"Failovers"}
    assert json.loads(generate.render()) == dash


def test_panels_do_not_overlap() -> None:
    """Grid positions tile the 24-column grid without two panels on one cell."""
    taken: set[tuple[int, int]] = set()
    for panel in generate.build()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells

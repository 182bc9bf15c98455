"""The failover-router Grafana dashboard, as code.

``python -m dashboards.generate`` writes ``helm/failover-router/files/dashboard.json`` (the chart
ships it as a ConfigMap for Grafana's dashboard sidecar; ``dashboards/failover-router.json``
links to it for a manual import). A unit test fails when the file and this generator differ,
and ``tests/integration/test_monitoring.py`` evaluates every query below against a real
Prometheus scraping real routers during a failover.

Plain dicts of Grafana's dashboard JSON model (schemaVersion 39): no library, so what is
written here is what Grafana reads. Every query filters on the ``datacenter`` label (added by
the chart's ServiceMonitor) and the ``route`` variable where a route applies.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHART_FILE = ROOT / "helm" / "failover-router" / "files" / "dashboard.json"
UID = "failover-router"

DC = 'datacenter=~"$datacenter"'
DC_ROUTE = 'datacenter=~"$datacenter", route=~"$route"'
DS = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    """One PromQL query of the dashboard: a panel target, a variable or an annotation."""

    where: str  # panel title, "variable NAME" or "annotation NAME"
    expr: str
    legend: str = ""


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": True,
        "instant": False,
    }


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    grid: tuple[int, int, int, int],
    *,
    unit: str = "short",
    mappings: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    thresholds: list[dict[str, Any]] | None = None,
    target_mappings: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """One panel; ``target_mappings`` gives the value mappings of one target (by refId)."""
    x, y, w, h = grid
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            _target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "mappings": mappings or [],
                "custom": custom or {},
                "thresholds": {
                    "mode": "absolute",
                    "steps": thresholds or [{"color": "green", "value": None}],
                },
            },
            "overrides": [
                {
                    "matcher": {"id": "byFrameRefID", "options": ref},
                    "properties": [{"id": "mappings", "value": value}],
                }
                for ref, value in (target_mappings or {}).items()
            ],
        },
        "options": options or {},
    }


def _row(title: str, y: int) -> dict[str, Any]:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def _values(*pairs: tuple[str, str, str]) -> list[dict[str, Any]]:
    """Value mappings: (value, text, color)."""
    return [
        {
            "type": "value",
            "options": {
                value: {"text": text, "color": color, "index": i}
                for i, (value, text, color) in enumerate(pairs)
            },
        }
    ]


TIMELINE = {"showValue": "never", "mergeValues": True, "rowHeight": 0.8}
TIMESERIES = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
LEGEND = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}


def panels() -> list[dict[str, Any]]:
    """Every panel, top to bottom: what is active, how healthy, how far behind, what was lost."""
    out: list[dict[str, Any]] = [_row("Which cluster gets the stream", 0)]
    out.append(
        _panel(
            "state-timeline",
            "Active cluster per route",
            "1 while the destination receives the route's stream, on any replica. A failover "
            "moves the bar from the primary to the standby; the hand-back moves it back. The "
            "bar's start is when it became active.",
            [
                (
                    f"max by (route, cluster) (frouter_destination_active{{{DC_ROUTE}}})",
                    "{{route}} → {{cluster}}",
                )
            ],
            (0, 1, 16, 8),
            mappings=_values(("1", "active", "green"), ("0", "idle", "transparent")),
            options={**TIMELINE, **LEGEND},
        )
    )
    out.append(
        _panel(
            "table",
            "Active now",
            "The clusters that receive each route's stream at the end of the time range.",
            [
                (
                    f"max by (route, cluster) (frouter_destination_active{{{DC_ROUTE}}}) == 1",
                    "",
                )
            ],
            (16, 1, 8, 8),
            options={"showHeader": True},
        )
    )
    out[-1]["targets"][0].update({"instant": True, "range": False, "format": "table"})
    out.append(_row("Cluster health", 9))
    out.append(
        _panel(
            "state-timeline",
            "Cluster health verdict",
            "UP/DOWN as the replicas' verdict says (the lowest, so one replica's DOWN shows), "
            "and whether the topology (or Consul KV) drains the cluster.",
            [
                (f"min by (cluster) (frouter_cluster_up{{{DC}}})", "{{cluster}} up"),
                (f"max by (cluster) (frouter_cluster_drained{{{DC}}})", "{{cluster}} drained"),
            ],
            (0, 10, 16, 8),
            mappings=_values(("1", "UP", "green"), ("0", "DOWN", "red")),
            target_mappings={"B": _values(("1", "drained", "orange"), ("0", "", "transparent"))},
            options={**TIMELINE, **LEGEND},
        )
    )
    out.append(
        _panel(
            "state-timeline",
            "Verdict source and Consul leader",
            "Per replica: local = it acts on its own probes (no Consul, or Consul unreachable); "
            "shared = it follows the Consul leader's verdict. Leader = holds the datacenter's "
            "lock and publishes the verdict.",
            [
                (f"max by (instance) (frouter_verdict_local{{{DC}}})", "{{instance}} local"),
                (f"max by (instance) (frouter_consul_leader{{{DC}}})", "{{instance}} leader"),
            ],
            (16, 10, 8, 8),
            mappings=_values(("1", "yes", "blue"), ("0", "no", "transparent")),
            options={**TIMELINE, **LEGEND},
        )
    )
    out.append(_row("Throughput and lag", 18))
    out.append(
        _panel(
            "timeseries",
            "Points written per cluster",
            "Lines InfluxDB accepted, per second.",
            [
                (
                    "sum by (cluster) (rate(frouter_points_written_total"
                    f"{{{DC_ROUTE}}}[$__rate_interval]))",
                    "{{cluster}}",
                )
            ],
            (0, 19, 12, 8),
            unit="short",
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "timeseries",
            "Write latency (p50, p99)",
            "One batch, retries included.",
            [
                (
                    "histogram_quantile(0.99, sum by (cluster, le) (rate("
                    f"frouter_write_duration_seconds_bucket{{{DC_ROUTE}}}[$__rate_interval])))",
                    "{{cluster}} p99",
                ),
                (
                    "histogram_quantile(0.5, sum by (cluster, le) (rate("
                    f"frouter_write_duration_seconds_bucket{{{DC_ROUTE}}}[$__rate_interval])))",
                    "{{cluster}} p50",
                ),
            ],
            (12, 19, 12, 8),
            unit="s",
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "timeseries",
            "Lag per route and cluster (messages)",
            "End offset minus the destination group's committed offset, summed over partitions "
            "and replicas. A paused standby's lag grows on purpose; a returning primary's lag "
            "falls while it replays.",
            [
                (
                    f"sum by (route, cluster) (frouter_consumer_lag_messages{{{DC_ROUTE}}})",
                    "{{route}} → {{cluster}}",
                )
            ],
            (0, 27, 12, 8),
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "timeseries",
            "Lag per route and cluster (seconds)",
            "Age of the oldest message the destination group has not committed.",
            [
                (
                    f"max by (route, cluster) (frouter_consumer_lag_seconds{{{DC_ROUTE}}})",
                    "{{route}} → {{cluster}}",
                )
            ],
            (12, 27, 12, 8),
            unit="s",
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(_row("Failures and losses", 35))
    out.append(
        _panel(
            "timeseries",
            "Failovers and failed batches",
            "Failovers: a standby took over a route. Failed batches by reason (unavailable, "
            "timeout, misconfigured, dead_letter, internal).",
            [
                (
                    "sum by (route, cluster) (increase(frouter_failovers_total"
                    f"{{{DC_ROUTE}}}[$__rate_interval]))",
                    "failover {{route}} → {{cluster}}",
                ),
                (
                    "sum by (cluster, reason) (rate(frouter_batch_failures_total"
                    f"{{{DC_ROUTE}}}[$__rate_interval])) > 0",
                    "failed/s {{cluster}} {{reason}}",
                ),
            ],
            (0, 36, 12, 8),
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "timeseries",
            "Dead letters",
            "Lines InfluxDB refused, sent to the dead-letter topic (per second), and dead-letter "
            "deliveries that failed (the batch is held).",
            [
                (
                    "sum by (route, cluster) (rate(frouter_dead_letters_total"
                    f"{{{DC_ROUTE}}}[$__rate_interval]))",
                    "{{route}} → {{cluster}}",
                ),
                (
                    "sum by (route, cluster) (rate(frouter_dead_letter_errors_total"
                    f"{{{DC_ROUTE}}}[$__rate_interval]))",
                    "undeliverable {{route}} → {{cluster}}",
                ),
            ],
            (12, 36, 12, 8),
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "timeseries",
            "Retention loss and skipped ranges (messages)",
            "Lost: deleted by Kafka's retention before the cluster read them. Skipped: a "
            "returning primary with skip_missed jumped over them (the standby holds them).",
            [
                (
                    "sum by (route, cluster) (increase(frouter_retention_lost_messages_total"
                    f"{{{DC_ROUTE}}}[$__rate_interval]))",
                    "lost {{route}} → {{cluster}}",
                ),
                (
                    "sum by (route, cluster) (increase(frouter_skipped_messages_total"
                    f"{{{DC_ROUTE}}}[$__rate_interval]))",
                    "skipped {{route}} → {{cluster}}",
                ),
            ],
            (0, 44, 12, 8),
            custom={**TIMESERIES, "drawStyle": "bars", "fillOpacity": 80},
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "timeseries",
            "Stuck writes and stalls",
            "Age of the oldest batch not yet settled (past the write deadline /healthz fails) "
            "and destinations stalled (lag without commit progress).",
            [
                (
                    "max by (route, cluster) (frouter_oldest_unsettled_batch_seconds"
                    f"{{{DC_ROUTE}}})",
                    "oldest unsettled {{route}} → {{cluster}}",
                ),
                (
                    f"sum by (route, cluster) (frouter_destination_stalled{{{DC_ROUTE}}})",
                    "stalled {{route}} → {{cluster}}",
                ),
            ],
            (12, 44, 12, 8),
            unit="s",
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(_row("Replicas and topology", 52))
    out.append(
        _panel(
            "timeseries",
            "Destination states",
            "How many destinations are in each state (active, paused, draining, backoff, "
            "blocked, stopped, crashed), over every replica.",
            [
                (
                    f"sum by (state) (frouter_destination_state{{{DC_ROUTE}}})",
                    "{{state}}",
                )
            ],
            (0, 53, 8, 8),
            custom={**TIMESERIES, "stacking": {"mode": "normal"}},
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "timeseries",
            "Partitions per replica",
            "Partitions of each route a replica owns (its membership group), and how many of "
            "them its destinations have paused.",
            [
                (
                    f"max by (instance, route) (frouter_assigned_partitions{{{DC_ROUTE}}})",
                    "{{instance}} {{route}} owned",
                ),
                (
                    f"sum by (instance, route) (frouter_paused_partitions{{{DC_ROUTE}}})",
                    "{{instance}} {{route}} paused",
                ),
            ],
            (8, 53, 8, 8),
            custom=TIMESERIES,
            options=LEGEND,
        )
    )
    out.append(
        _panel(
            "state-timeline",
            "Topology file valid",
            "0 while the last edit of the topology (ConfigMap) was refused: the router runs on "
            "the last good one, and the refused edit (a drain?) is not applied.",
            [
                (
                    f"min by (instance) (frouter_topology_last_reload_ok{{{DC}}})",
                    "{{instance}}",
                )
            ],
            (16, 53, 8, 8),
            mappings=_values(("1", "valid", "green"), ("0", "REFUSED", "red")),
            options={**TIMELINE, **LEGEND},
        )
    )
    return out


def templating() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": DS,
            "query": {"query": query, "refId": f"var-{name}"},
            "definition": query,
            "refresh": 2,
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"text": "All", "value": "$__all"},
            "sort": 1,
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Prometheus",
            "query": "prometheus",
            "current": {},
        },
        query_var("datacenter", "Datacenter", "label_values(frouter_cluster_up, datacenter)"),
        query_var(
            "route",
            "Route",
            f"label_values(frouter_destination_active{{{DC}}}, route)",
        ),
    ]


def annotation_list() -> list[dict[str, Any]]:
    def annotation(name: str, expr: str, title: str, text: str, color: str) -> dict[str, Any]:
        return {
            "name": name,
            "datasource": DS,
            "enable": True,
            "iconColor": color,
            "expr": expr,
            "step": "15s",
            "titleFormat": title,
            "textFormat": text,
            "useValueForTime": False,
        }

    return [
        {
            "builtIn": 1,
            "name": "Annotations & Alerts",
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "type": "dashboard",
        },
        annotation(
            "Failovers",
            f"sum by (route, cluster) (increase(frouter_failovers_total{{{DC}}}[1m])) > 0",
            "failover",
            "{{route}}: {{cluster}} took over",
            "red",
        ),
        annotation(
            "Active cluster changes",
            f"sum by (route, cluster) (changes(frouter_destination_active{{{DC}}}[1m])) > 0",
            "active changed",
            "{{route}} → {{cluster}} (failover, hand-back or drain)",
            "orange",
        ),
    ]


def build() -> dict[str, Any]:
    """The whole dashboard."""
    return {
        "uid": UID,
        "title": "failover-router",
        "description": "Kafka -> InfluxDB failover router: which cluster gets each route, "
        "cluster health, lag, throughput, failures and losses.",
        "tags": ["failover-router", "kafka", "influxdb"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": templating()},
        "annotations": {"list": annotation_list()},
        "panels": panels(),
        "links": [],
    }


def queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL query in a dashboard: panel targets, query variables, annotations."""
    out: list[Query] = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append(Query(panel["title"], target["expr"], target.get("legendFormat", "")))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(Query(f"variable {var['name']}", var["query"]["query"]))
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            out.append(Query(f"annotation {ann['name']}", ann["expr"], ann["textFormat"]))
    return out


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    CHART_FILE.write_text(render(), encoding="utf-8")
    print(f"wrote {CHART_FILE.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

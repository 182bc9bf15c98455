"""Prometheus metrics in the router's own registry (a fresh one per Router, so per test).

Labels are bounded: route, cluster, topic, outcome. Never a URL or an error text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from router.guard import GuardStats

# The closed label values of the labelled series (each exposed with 0 from the start).
BATCH_OUTCOMES = ("ok", "failed", "misconfigured", "dead_letter_error")
FAILURE_REASONS = ("unavailable", "timeout", "tls", "misconfigured", "dead_letter", "internal")
RELOAD_OUTCOMES = ("applied", "rejected")
# The states a destination reports (frouter_destination_state has one series per state).
DESTINATION_STATES = (
    "starting",
    "paused",
    "active",
    "draining",
    "backoff",
    "blocked",
    "stopped",
    "crashed",
    "closed",
)


class Metrics:
    """Every metric of the router. ``init_route`` and ``init_cluster`` expose each labelled
    series with 0 (or its neutral value) as soon as a route is built, so ``rate()`` and
    ``absent()`` alert rules work from the first scrape."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        rc = ["route", "cluster"]
        self.points_written = Counter(
            "frouter_points_written", "Lines InfluxDB accepted", rc, registry=r
        )
        self.messages_written = Counter(
            "frouter_messages_written", "Kafka messages written and committable", rc, registry=r
        )
        self.batches = Counter(
            "frouter_batches", "Batches by outcome", [*rc, "outcome"], registry=r
        )
        self.write_seconds = Histogram(
            "frouter_write_duration_seconds",
            "Time to write one batch, retries included",
            rc,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_flight = Gauge("frouter_batches_in_flight", "Batches being written", rc, registry=r)
        self.consumer_lag = Gauge(
            "frouter_consumer_lag_messages",
            "Messages not yet committed by the destination group",
            [*rc, "topic"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "frouter_consumer_lag_seconds",
            "Age of the oldest message the destination group has not committed (0: no lag)",
            rc,
            registry=r,
        )
        self.paused_partitions = Gauge(
            "frouter_paused_partitions",
            "Assigned partitions paused on this replica",
            rc,
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "frouter_assigned_partitions", "Partitions assigned to this replica", rc, registry=r
        )
        self.destination_active = Gauge(
            "frouter_destination_active", "1 if the destination receives the stream", rc, registry=r
        )
        self.cluster_up = Gauge(
            "frouter_cluster_up", "1 if the cluster is UP", ["cluster"], registry=r
        )
        self.cluster_reachable = Gauge(
            "frouter_cluster_reachable",
            "1 if this replica's own probes see the cluster UP (with a shared verdict a replica "
            "that cannot reach a cluster fails over the partitions it owns)",
            ["cluster"],
            registry=r,
        )
        self.cluster_drained = Gauge(
            "frouter_cluster_drained",
            "1 if the topology drains the cluster",
            ["cluster"],
            registry=r,
        )
        self.failovers = Counter(
            "frouter_failovers",
            "Times a standby took over a route",
            ["route", "cluster"],
            registry=r,
        )
        self.dead_letters = Counter(
            "frouter_dead_letters",
            "Lines sent to the dead-letter topic",
            [*rc, "topic"],
            registry=r,
        )
        self.retention_lost = Counter(
            "frouter_retention_lost_messages",
            "Messages that fell out of Kafka retention before the destination read them",
            [*rc, "topic"],
            registry=r,
        )
        self.skipped = Counter(
            "frouter_skipped_messages",
            "Messages a returning primary skipped (skip_missed: true); held by the standby",
            [*rc, "topic"],
            registry=r,
        )
        self.topology_reloads = Counter(
            "frouter_topology_reloads", "Topology reloads by outcome", ["outcome"], registry=r
        )
        self.topology_valid = Gauge(
            "frouter_topology_last_reload_ok", "0 while the watched file is invalid", registry=r
        )
        self.verdict_local = Gauge(
            "frouter_verdict_local",
            "1 while this replica acts on its own probes (no Consul, or Consul unreachable)",
            registry=r,
        )
        self.consul_leader = Gauge(
            "frouter_consul_leader", "1 while this replica holds the datacenter's lock", registry=r
        )
        self.leader_changes = Counter(
            "frouter_consul_leader_changes", "Leader changes seen in Consul KV", registry=r
        )
        self.consul_errors = Counter(
            "frouter_consul_errors", "Consul calls that failed", registry=r
        )
        self.sink_misconfigured = Gauge(
            "frouter_destination_misconfigured",
            "1 if InfluxDB refused our credentials/database (401/403/404)",
            rc,
            registry=r,
        )
        self.dead_letter_errors = Counter(
            "frouter_dead_letter_errors",
            "Dead-letter sends that failed (the batch is held, nothing committed past it)",
            rc,
            registry=r,
        )
        self.oldest_unsettled = Gauge(
            "frouter_oldest_unsettled_batch_seconds",
            "Age of the destination's oldest batch not yet written and settled (0: none)",
            rc,
            registry=r,
        )
        self.destination_state = Gauge(
            "frouter_destination_state",
            "1 for the state the destination is in (starting, paused, active, backoff, "
            "blocked, stopped, crashed, closed), 0 for the others",
            [*rc, "state"],
            registry=r,
        )
        self.destination_stalled = Gauge(
            "frouter_destination_stalled",
            "1 while an active destination has lag but its commits have not moved for longer "
            "than its write deadline",
            rc,
            registry=r,
        )
        self.batch_failures = Counter(
            "frouter_batch_failures",
            "Failed batches by reason "
            "(unavailable, timeout, tls, misconfigured, dead_letter, internal)",
            [*rc, "reason"],
            registry=r,
        )
        for outcome in RELOAD_OUTCOMES:
            self.topology_reloads.labels(outcome=outcome)

    def watch_guards(self, source: Callable[[], Mapping[str, GuardStats]]) -> None:
        """Expose the route guards' counters (``GuardCollector``), read from ``source`` at
        scrape time; a second call replaces the source."""
        collector = getattr(self, "_guard_collector", None)
        if collector is None:
            collector = GuardCollector(source)
            self.registry.register(collector)
            self._guard_collector = collector
        collector.source = source

    def init_cluster(self, cluster: str) -> None:
        """The cluster's series, before its first verdict (not up, not drained, reachable)."""
        self.cluster_up.labels(cluster=cluster)
        self.cluster_drained.labels(cluster=cluster)
        self.cluster_reachable.labels(cluster=cluster)

    def init_route(self, route: str, clusters: Iterable[str], topics: Iterable[str]) -> None:
        """Every (route, cluster) series of a route just built; per topic only for topics
        named literally (a regex's topics are known once the lag reader found them)."""
        named = [t for t in topics if not t.startswith("^")]
        for cluster in clusters:
            rc = {"route": route, "cluster": cluster}
            for counter in (
                self.points_written,
                self.messages_written,
                self.failovers,
                self.dead_letter_errors,
            ):
                counter.labels(**rc)
            for gauge in (
                self.in_flight,
                self.paused_partitions,
                self.assigned_partitions,
                self.destination_active,
                self.sink_misconfigured,
                self.oldest_unsettled,
                self.destination_stalled,
                self.consumer_lag_seconds,
            ):
                gauge.labels(**rc)
            self.write_seconds.labels(**rc)
            for outcome in BATCH_OUTCOMES:
                self.batches.labels(**rc, outcome=outcome)
            for state in DESTINATION_STATES:
                self.destination_state.labels(**rc, state=state)
            for reason in FAILURE_REASONS:
                self.batch_failures.labels(**rc, reason=reason)
            for topic in named:
                self.consumer_lag.labels(**rc, topic=topic)
                self.dead_letters.labels(**rc, topic=topic)
                self.retention_lost.labels(**rc, topic=topic)
                self.skipped.labels(**rc, topic=topic)


class GuardCollector:
    """The route guards (``router.guard``) as metrics, built from their snapshots at scrape
    time, so the data path pays nothing for them.

    Labels stay bounded: ``route``, and ``rule`` (names an operator wrote in the topology).
    The measurement is not a label (one exploding producer would make one series per
    measurement here too): per-measurement figures are on ``/api/status`` (top offenders).
    """

    def __init__(self, source: Callable[[], Mapping[str, GuardStats]]) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        blocked, refused, new, series, measurements, limited = families
        for route, st in self.source().items():
            for rule, lines in st.blocked.items():
                blocked.add_metric([route, rule], lines)
            refused.add_metric([route], st.refused)
            new.add_metric([route], st.new_series)
            series.add_metric([route], st.series)
            measurements.add_metric([route], st.measurements)
            limited.add_metric([route], st.limited)
        return iter(families)

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        route = ["route"]
        return (
            CounterMetricFamily(
                "frouter_guard_blocked_lines",
                "Lines a block rule refused (dead-lettered as blocked:<rule>)",
                labels=["route", "rule"],
            ),
            CounterMetricFamily(
                "frouter_guard_cardinality_refused_lines",
                "Lines refused because they would create a series over a limit "
                "(dead-lettered as cardinality:<measurement>)",
                labels=route,
            ),
            CounterMetricFamily(
                "frouter_guard_new_series",
                "Series the cardinality guard let through as new",
                labels=route,
            ),
            GaugeMetricFamily(
                "frouter_guard_series", "Series the cardinality guard tracks now", labels=route
            ),
            GaugeMetricFamily(
                "frouter_guard_measurements",
                "Measurements the cardinality guard tracks now",
                labels=route,
            ),
            GaugeMetricFamily(
                "frouter_guard_limited_measurements",
                "Measurements that had a line refused for cardinality in the last minute "
                "(which ones: /api/status)",
                labels=route,
            ),
        )

"""Prometheus metrics in the router's own registry (a fresh one per Router, so per test).

Labels are bounded: route, cluster, topic, outcome. Never a URL or an error text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
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
            "Failed batches by reason (unavailable, timeout, misconfigured, dead_letter, internal)",
            [*rc, "reason"],
            registry=r,
        )

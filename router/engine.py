"""The router: destinations per (route, cluster), a control loop that applies the policy, and
live topology reloads.

The control loop gathers the inputs of ``policy.decide`` (health verdicts, drain flags, the
primary group's lag read from Kafka) every ``TICK`` seconds and carries out its actions on the
destinations. A graceful deactivation (drain, hand-back) is waited for before the next cluster
is activated, so that cluster reads the offsets the first one committed last.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from health.checker import ClusterSpec, HealthChecker
from health.consul import ConsulSettings
from health.shared import ClusterSource, DiscoverySpec, SharedVerdict, replica_id
from health.verdict import ClusterState, Verdict, VerdictSource
from router.destination import Destination, DestinationSpec
from router.errors import ConfigError, SourceError
from router.kafka import DeadLetterProducer, KafkaAdmin
from router.metrics import Metrics
from router.offsets import TopicPart
from router.policy import ClusterView, Deactivate, RouteView, StartFrom, decide
from router.sink import InfluxSink, InfluxTarget
from router.topology import ClusterConfig, RouteConfig, Topology, load_topology

log = structlog.get_logger("router")

TICK = 0.25
LAG_EVERY = 2.0


def influx_target(name: str, cluster: ClusterConfig) -> InfluxTarget:
    creds = cluster.credentials()
    return InfluxTarget(
        cluster=name,
        api=cluster.api,
        database=cluster.database,
        retention_policy=cluster.retention_policy,
        org=cluster.org,
        bucket=cluster.bucket,
        precision=cluster.precision,
        username=creds[0] if creds else None,
        password=creds[1] if creds else None,
        token=cluster.token(),
        timeout=cluster.write_timeout,
        max_retries=cluster.max_retries,
        gzip=cluster.gzip,
    )


def health_specs(topology: Topology) -> dict[str, ClusterSpec]:
    return {
        name: ClusterSpec(api=c.api, nodes=tuple(c.urls), min_healthy=c.min_healthy)
        for name, c in topology.clusters.items()
    }


def cluster_sources(topology: Topology) -> dict[str, ClusterSource]:
    return {
        name: ClusterSource(
            api=c.api,
            min_healthy=c.min_healthy,
            urls=tuple(c.urls),
            discovery=DiscoverySpec(c.consul_service, c.consul_tag, c.consul_datacenter)
            if c.consul_service
            else None,
        )
        for name, c in topology.clusters.items()
    }


def needs_consul(topology: Topology, consul: ConsulSettings | None) -> None:
    """A cluster found through Consul cannot work without a Consul address: refuse early."""
    if consul is not None:
        return
    errors = [
        f"clusters.{name}.consul_service: needs Consul (--consul-addr or CONSUL_HTTP_ADDR)"
        for name, c in topology.clusters.items()
        if c.consul_service
    ]
    if errors:
        raise ConfigError(errors)


def route_view(route: RouteConfig) -> RouteView:
    return RouteView(
        name=route.name,
        mode=route.mode,
        destinations=route.destinations,
        skip_missed=route.skip_missed,
        handback_lag=route.handback_lag,
    )


@dataclass
class _RouteRuntime:
    config: RouteConfig
    fingerprint: str
    destinations: dict[str, Destination]
    active: set[str] = field(default_factory=set)
    partitions: list[TopicPart] = field(default_factory=list)
    lag: dict[str, int] = field(default_factory=dict)  # cluster -> messages not committed
    # graceful deactivations under way: cluster -> (done, deadline); the route waits for them
    waiting: dict[str, tuple[threading.Event, float]] = field(default_factory=dict)


class Router:
    def __init__(
        self,
        topology: Topology,
        *,
        topology_path: str | Path | None = None,
        datacenter: str | None = None,
        metrics: Metrics | None = None,
        verdicts: VerdictSource | None = None,
        consul: ConsulSettings | None = None,
    ) -> None:
        needs_consul(topology, consul)
        self.topology = topology
        self._consul = consul
        self._path = Path(topology_path) if topology_path else None
        self._datacenter = datacenter
        self._file_hash = self._hash_file() if self._path else ""
        self.metrics = metrics or Metrics()
        self._kafka_config = topology.kafka.librdkafka_config()
        self._admin = KafkaAdmin(self._kafka_config)
        self._dlq = DeadLetterProducer(self._kafka_config, topology.kafka.dead_letters)
        self._own_health: HealthChecker | None = None
        self.shared: SharedVerdict | None = None
        if verdicts is None:
            h = topology.health
            self._own_health = HealthChecker(
                {} if consul else health_specs(topology),
                interval=h.interval,
                timeout=h.timeout,
                fall=h.fall,
                rise=h.rise,
            )
            verdicts = self._own_health
            if consul is not None:
                port = int(consul.advertise.rpartition(":")[2] or 0)
                self.shared = SharedVerdict(
                    consul,
                    self._own_health,
                    cluster_sources(topology),
                    datacenter=topology.datacenter,
                    replica=replica_id(topology.datacenter, port),
                )
                verdicts = self.shared
        self.verdicts: VerdictSource = verdicts
        self._seen_leader_changes = 0
        self._seen_consul_errors = 0
        self.verdicts.subscribe(self._on_verdict)
        self._routes: dict[str, _RouteRuntime] = {}
        self._misconfigured: dict[str, str] = {}
        self._mis_lock = threading.Lock()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self.last_tick = 0.0
        self.reload_error = ""
        self.started_at = time.time()

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self.shared is not None:
            self.shared.start()  # starts the local checker too
        elif self._own_health is not None:
            self._own_health.start()
        with self._lock:
            for route in self.topology.routes:
                self._routes[route.name] = self._build_route(route)
        log.info(
            "router_started",
            datacenter=self.topology.datacenter,
            routes=len(self.topology.routes),
            clusters=len(self.topology.clusters),
        )
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop fetching, finish in-flight writes, commit, leave the groups."""
        log.info("router_stopping", reason="stop requested")
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            routes = list(self._routes.values())
            self._routes = {}
        self._stop_destinations([d for r in routes for d in r.destinations.values()], timeout)
        if self.shared is not None:
            self.shared.stop()  # releases the lock, deregisters, stops the local checker
        elif self._own_health is not None:
            self._own_health.stop()
        self._dlq.close()
        self._admin.close()

    def _stop_destinations(self, dests: list[Destination], timeout: float) -> None:
        threads = [threading.Thread(target=d.stop, args=(timeout,)) for d in dests]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            while t.is_alive() and time.monotonic() < deadline:
                t.join(1.0)
                self.last_tick = time.time()  # busy stopping, not stalled (/healthz)

    # --- building -----------------------------------------------------------------------

    def _fingerprint(self, route: RouteConfig) -> str:
        """What, if changed, needs the route's destinations rebuilt (drain flags excluded)."""
        clusters = {
            c: self.topology.clusters[c].model_dump(exclude={"drain"}) for c in route.destinations
        }
        raw = repr((route.model_dump(), clusters, self.topology.kafka.model_dump()))
        return hashlib.sha256(raw.encode()).hexdigest()

    def _build_route(self, route: RouteConfig) -> _RouteRuntime:
        dests = {c: self._build_destination(route, c) for c in route.destinations}
        return _RouteRuntime(route, self._fingerprint(route), dests)

    def _build_destination(self, route: RouteConfig, cluster: str) -> Destination:
        groups = tuple(self.topology.group_id(route.name, c) for c in route.destinations)
        cfg = self.topology.clusters[cluster]
        spec = DestinationSpec(
            route=route.name,
            cluster=cluster,
            group=self.topology.group_id(route.name, cluster),
            topics=route.topics,
            peer_groups=groups,
            max_points=route.batch.max_points,
            max_bytes=route.batch.max_bytes,
            linger=route.batch.linger,
            max_in_flight=route.batch.max_in_flight,
            # one batch with retries; bisection of a 400 makes more requests: be generous
            write_deadline=max(60.0, 4 * (cfg.max_retries + 1) * cfg.write_timeout),
            graphite_templates=route.graphite_templates if route.format == "graphite" else (),
        )
        target = influx_target(cluster, cfg)
        if route.format == "graphite":  # converted lines carry nanosecond timestamps
            target = dataclasses.replace(target, precision="ns")
        sink = InfluxSink(
            target,
            nodes=functools.partial(self.verdicts.healthy_nodes, cluster),
            on_node_result=functools.partial(self.verdicts.report_write, cluster),
        )
        dest = Destination(
            spec,
            kafka_config=self._kafka_config,
            sink=sink,
            admin=self._admin,
            dead_letters=self._dlq,
            metrics=self.metrics,
            on_misconfigured=self._on_misconfigured,
        )
        dest.start()
        return dest

    # --- control loop -------------------------------------------------------------------

    def _on_verdict(self, old: Verdict, new: Verdict) -> None:
        self._wake.set()

    def _on_misconfigured(self, cluster: str, why: str) -> None:
        # Called from a destination thread, maybe while the engine waits for it: own lock.
        with self._mis_lock:
            self._misconfigured[cluster] = why
        self._wake.set()

    def _drained(self, name: str) -> bool:
        """The topology's flag OR the Consul KV override: either one drains."""
        kv = self.shared is not None and self.shared.drained(name)
        return self.topology.clusters[name].drain or kv

    def _views(self) -> dict[str, ClusterView]:
        views = {}
        with self._mis_lock:
            misconfigured = dict(self._misconfigured)
        for name in self.topology.clusters:
            v = self.verdicts.verdict(name)
            healthy = v.state is ClusterState.UP and name not in misconfigured
            reason = misconfigured.get(name, v.reason)
            drained = self._drained(name)
            views[name] = ClusterView(healthy=healthy, drained=drained, reason=reason)
            self.metrics.cluster_up.labels(cluster=name).set(1 if healthy else 0)
            self.metrics.cluster_drained.labels(cluster=name).set(1 if drained else 0)
        self._publish_consul_metrics()
        return views

    def _publish_consul_metrics(self) -> None:
        shared = self.shared
        m = self.metrics
        m.verdict_local.set(0 if shared is not None and shared.source == "shared" else 1)
        if shared is None:
            return
        m.consul_leader.set(1 if shared.is_leader else 0)
        m.leader_changes.inc(shared.leader_changes - self._seen_leader_changes)
        self._seen_leader_changes = shared.leader_changes
        m.consul_errors.inc(shared.consul_errors - self._seen_consul_errors)
        self._seen_consul_errors = shared.consul_errors

    def _loop(self) -> None:
        last_lag = 0.0
        while not self._stop.is_set():
            self._wake.wait(TICK)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._maybe_reload()
            now = time.monotonic()
            poll_lag = now - last_lag >= LAG_EVERY
            if self.shared is not None and not self.shared.ready():
                self.last_tick = time.time()
                continue  # discovery has not answered yet: no decision on empty node lists
            with self._lock:
                views = self._views()
                for rt in list(self._routes.values()):
                    try:
                        if poll_lag:
                            self._refresh_lag(rt, rt.config.destinations)
                        elif self._replaying(rt):  # only the hand-back needs it this often
                            self._refresh_lag(rt, rt.config.destinations[:1])
                        self._step(rt, views)
                    except SourceError as exc:
                        log.warning("control_error", route=rt.config.name, error=str(exc))
            if poll_lag:
                last_lag = now
            self.last_tick = time.time()

    def _replaying(self, rt: _RouteRuntime) -> bool:
        """A returning primary replays next to a standby: its lag decides the hand-back."""
        return rt.config.mode == "failover" and len(rt.active) > 1

    def _refresh_lag(self, rt: _RouteRuntime, clusters: tuple[str, ...]) -> None:
        rt.partitions = self._admin.partitions(rt.config.topics)
        for cluster in clusters:
            group = self.topology.group_id(rt.config.name, cluster)
            lag = self._admin.lag(group, rt.partitions)
            rt.lag[cluster] = sum(lag.values())
            per_topic: dict[str, int] = {}
            for (topic, _p), n in lag.items():
                per_topic[topic] = per_topic.get(topic, 0) + n
            for topic, n in per_topic.items():
                self.metrics.consumer_lag.labels(
                    route=rt.config.name, cluster=cluster, topic=topic
                ).set(n)

    def _rebuild_crashed(self, rt: _RouteRuntime) -> None:
        for cluster, dest in list(rt.destinations.items()):
            if dest.crashed:
                log.error(
                    "destination_rebuilt",
                    route=rt.config.name,
                    cluster=cluster,
                    reason=f"consumer thread ended: {dest.crashed}",
                )
                rt.destinations[cluster] = self._build_destination(rt.config, cluster)
                rt.active.discard(cluster)  # the policy activates it again if it should be
                rt.waiting.pop(cluster, None)

    def _step(self, rt: _RouteRuntime, views: Mapping[str, ClusterView]) -> None:
        self._rebuild_crashed(rt)
        now = time.monotonic()
        for cluster, (done, deadline) in list(rt.waiting.items()):
            if done.is_set() or now >= deadline:
                del rt.waiting[cluster]
        if rt.waiting:
            return  # a graceful handoff is flushing: the next cluster reads its commits after
        route = route_view(rt.config)
        actions = decide(route, views, frozenset(rt.active), rt.lag.get(route.primary))
        for action in actions:
            dest = rt.destinations[action.cluster]
            if isinstance(action, Deactivate):
                serving_before = set(rt.active)
                done = dest.deactivate(action.graceful, action.reason)
                rt.active.discard(action.cluster)
                if action.graceful:
                    rt.waiting[action.cluster] = (done, now + dest.spec.write_deadline)
                if action.cluster != route.primary and route.primary in serving_before:
                    log.warning(
                        "handback",
                        route=route.name,
                        from_cluster=action.cluster,
                        to_cluster=route.primary,
                        reason=action.reason,
                    )
                continue
            if rt.waiting:
                return  # activate on a later tick, once the graceful deactivation is done
            if action.start is StartFrom.TAKEOVER:
                from_cluster = next(
                    (
                        c
                        for c in route.destinations
                        if c != action.cluster and not views.get(c, ClusterView(False)).usable
                    ),
                    route.primary,
                )
                self.metrics.failovers.labels(route=route.name, cluster=action.cluster).inc()
                log.warning(
                    "failover",
                    route=route.name,
                    from_cluster=from_cluster,
                    to_cluster=action.cluster,
                    reason=action.reason,
                )
            dest.activate(action.start)
            rt.active.add(action.cluster)

    # --- topology reload ----------------------------------------------------------------

    def _hash_file(self) -> str:
        assert self._path is not None
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        digest = self._hash_file()
        if not digest or digest == self._file_hash:
            return
        self._file_hash = digest
        try:
            new = load_topology(self._path, datacenter=self._datacenter)
            needs_consul(new, self._consul)
        except ConfigError as exc:
            self.reload_error = "; ".join(exc.errors)
            self.metrics.topology_reloads.labels(outcome="rejected").inc()
            self.metrics.topology_valid.set(0)
            log.error(
                "topology_rejected",
                path=str(self._path),
                errors=exc.errors,
                reason="invalid topology; still running on the last good one",
            )
            return
        self.reload_error = ""
        self.metrics.topology_valid.set(1)
        self.metrics.topology_reloads.labels(outcome="applied").inc()
        self.apply(new)

    def apply(self, new: Topology) -> None:
        """Move to a new valid topology without a restart."""
        with self._lock:
            old = self.topology
            changed_clusters = {
                n
                for n, c in new.clusters.items()
                if n not in old.clusters
                or old.clusters[n].model_dump(exclude={"drain"}) != c.model_dump(exclude={"drain"})
            }
            with self._mis_lock:
                for n in changed_clusters:
                    self._misconfigured.pop(n, None)
            self.topology = new
            if self.shared is not None:
                self.shared.set_sources(cluster_sources(new))
            elif self._own_health is not None:
                self._own_health.update(health_specs(new))
            wanted = {r.name: r for r in new.routes}
            stale = []
            for name, rt in list(self._routes.items()):
                if name not in wanted or self._fingerprint(wanted[name]) != rt.fingerprint:
                    stale.append(rt)
                    del self._routes[name]
            self._stop_destinations([d for rt in stale for d in rt.destinations.values()], 60.0)
            for name, route in wanted.items():
                if name not in self._routes:
                    self._routes[name] = self._build_route(route)
            drains = sorted(n for n, c in new.clusters.items() if c.drain)
            log.info(
                "topology_reloaded",
                routes=len(new.routes),
                rebuilt=len(stale),
                drained=",".join(drains) or "none",
            )
        self._wake.set()

    # --- observation --------------------------------------------------------------------

    def ready(self) -> bool:
        discovered = self.shared is None or self.shared.ready()
        return self.last_tick > 0 and discovered and not self._stop.is_set()

    def alive(self) -> bool:
        return self.last_tick == 0 or time.time() - self.last_tick < 15

    def status(self) -> dict[str, Any]:
        with self._mis_lock:
            misconfigured = dict(self._misconfigured)
        with self._lock:
            clusters = {}
            for name, cfg in self.topology.clusters.items():
                v = self.verdicts.verdict(name)
                clusters[name] = {
                    "state": v.state.value,
                    "since": v.since,
                    "reason": misconfigured.get(
                        name, v.reason if v.state is ClusterState.DOWN else "healthy"
                    ),
                    "drain": self._drained(name),
                    "drain_source": "topology"
                    if cfg.drain
                    else ("consul" if self._drained(name) else ""),
                    "misconfigured": name in misconfigured,
                    "healthy_nodes": len(self.verdicts.healthy_nodes(name)),
                    "nodes": len(cfg.urls),
                }
            routes = []
            for rt in self._routes.values():
                dests = []
                for cluster, dest in rt.destinations.items():
                    st = dest.status
                    dests.append(
                        {
                            "cluster": cluster,
                            "group": st.group,
                            "active": cluster in rt.active,
                            "state": st.state,
                            "lag": rt.lag.get(cluster),
                            "assigned": len(st.assigned),
                            "paused": len(st.paused),
                            "in_flight": st.in_flight,
                            "error": st.error,
                        }
                    )
                routes.append(
                    {
                        "name": rt.config.name,
                        "mode": rt.config.mode,
                        "topics": list(rt.config.topics),
                        "primary": rt.config.destinations[0],
                        "active": sorted(rt.active),
                        "destinations": dests,
                    }
                )
        shared = self.shared
        verdict = {
            "source": shared.source if shared is not None else "local",
            "consul": shared is not None,
            "replica": shared.replica if shared is not None else "",
            "leader": shared.leader if shared is not None else "",
            "is_leader": shared.is_leader if shared is not None else False,
        }
        return {
            "datacenter": self.topology.datacenter,
            "verdict": verdict,
            "started_at": self.started_at,
            "topology_error": self.reload_error,
            "clusters": clusters,
            "routes": routes,
        }

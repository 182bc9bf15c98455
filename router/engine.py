"""The router: builds its parts, wires them and runs their life cycle.

Threads (each part's module says what its thread may touch):

- "control" (``router.control.ControlLoop``): applies the failover policy to every route, with
  the cluster views this module gives it and the latest lag readings; never waits on I/O;
- "lag" (``router.lag.LagReader``): the only thread that reads lag and watermarks from Kafka;
- "reload" (``router.reload.Reloader`` + ``Rebuilder``): watches the topology file and moves
  routes to new destinations without two consumers of one group at once;
- one consumer thread and a few writer threads per destination (``router.destination``);
- the health checker's threads (``health``), which call ``_on_verdict``.

``status`` and ``health`` (what ``/api/status`` and ``/healthz`` serve) are assembled by
``router.status`` from snapshots: they never wait on a thread that does I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from health.checker import ClusterSpec, HealthChecker
from health.consul import ConsulSettings
from health.shared import ClusterSource, DiscoverySpec, SharedVerdict, replica_id
from health.verdict import ClusterState, Verdict, VerdictSource
from router import status
from router.clients import CurrentAdmin, KafkaClients, Resolved, Retired, resolve
from router.control import (
    ControlLoop,
    DestinationFactory,
    DestinationLike,
    RoutePlan,
    RouteRuntime,
)
from router.destination import Destination, DestinationSpec
from router.errors import ConfigError, KafkaRefused, RouterError
from router.guard import Guards
from router.kafka import KAFKA_CHECK_TIMEOUT, DeadLetterProducer, KafkaAdmin
from router.lag import LagReader
from router.membership import REVOKE_WAIT, RouteMembership
from router.metrics import Metrics
from router.policy import ClusterView
from router.reload import Rebuilder, Reloader, groups_in_use, plans_of
from router.reprobe import Reprober
from router.secrets import file_stamp
from router.sink import Credentials, InfluxSink, InfluxTarget
from router.source import AssignedSource
from router.topology import ClusterConfig, KafkaConfig, Topology, load_topology

log = structlog.get_logger("router")

TICK = 0.25  # seconds between two passes of the control loop (a verdict change wakes it)
LAG_EVERY = 2.0  # seconds between two full reads of every group's lag
LAG_TIMEOUT = 5.0  # deadline of one Kafka read of the lag reader
TICK_TIMEOUT = 15.0  # /healthz fails when the control loop has not ticked for this long
# /readyz: an empty partition assignment counts as final once it stood this long. A replica
# that joins gets [] in the first round of a cooperative rebalance and its partitions in a
# second one, once their old owner released them (at most REVOKE_WAIT), plus a heartbeat.
EMPTY_ASSIGNMENT_GRACE = REVOKE_WAIT + 2.0


def credentials_of(cluster: ClusterConfig) -> Credentials:
    """The cluster's credentials as they are now (asked before every write: a secret file is
    read again only when it changed). Raises ConfigError if a secret cannot be read."""
    creds = cluster.credentials()
    username, password = creds if creds is not None else (None, None)
    return Credentials(username, password, cluster.token())


def secret_version(cluster: ClusterConfig) -> object:
    """What changes when one of the cluster's secret files changes (a rotation)."""
    return tuple(file_stamp(p) for p in (cluster.password_file, cluster.token_file) if p)


def influx_target(name: str, cluster: ClusterConfig) -> InfluxTarget:
    return InfluxTarget(
        cluster=name,
        api=cluster.api,
        flavor=cluster.flavor,
        database=cluster.database,
        retention_policy=cluster.retention_policy,
        org=cluster.org,
        bucket=cluster.bucket,
        precision=cluster.precision,
        credentials=functools.partial(credentials_of, cluster),
        timeout=cluster.write_timeout,
        max_retries=cluster.max_retries,
        compression=cluster.compression,
        compression_level=cluster.compression_level,
        tls=cluster.tls_settings(),
    )


def health_specs(topology: Topology) -> dict[str, ClusterSpec]:
    return {
        name: ClusterSpec(
            api=c.api,
            nodes=tuple(c.urls),
            min_healthy=c.min_healthy,
            flavor=c.flavor,
            tls=c.tls_settings(),
        )
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
            flavor=c.flavor,
            tls=c.tls_settings(),
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


def write_deadline(cluster: ClusterConfig) -> float:
    """How long one batch may take with its retries (bisection of a 400 makes more requests):
    the topology's ``write_deadline``, else derived from the timeout and the retries."""
    if cluster.write_deadline is not None:
        return cluster.write_deadline
    return max(60.0, 4 * (cluster.max_retries + 1) * cluster.write_timeout)


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
        destinations: DestinationFactory | None = None,
        tick: float = TICK,
        lag_interval: float = LAG_EVERY,
        lag_timeout: float = LAG_TIMEOUT,
        stall_after: float | None = None,
        tick_timeout: float = TICK_TIMEOUT,
        kafka_check_timeout: float = KAFKA_CHECK_TIMEOUT,
    ) -> None:
        """``destinations`` builds a route's destination (default: ``build_destination``);
        ``stall_after`` overrides the write deadline as the stall threshold (tests);
        ``kafka_check_timeout`` bounds the check of a new ``kafka:`` section on a reload."""
        needs_consul(topology, consul)
        self.topology = topology  # replaced (never mutated) by a reload
        self._consul = consul
        self._datacenter = datacenter
        self.metrics = metrics or Metrics()
        # the Kafka clients of the current kafka: section (replaced when it or a secret of it
        # changes); replaced sets stay open while destinations built with them are leaving
        self._kafka = KafkaClients.build(topology.kafka)
        self._retired_kafka = Retired()
        self._kafka_error = ""  # why the last kafka: section could not be applied
        # the section and settings (secrets read) the brokers refused last: not tried again
        # until they change, and the error clears when the secret is back to the one in use
        self._kafka_refused: tuple[KafkaConfig, Resolved] | None = None
        self._kafka_check_timeout = kafka_check_timeout
        self.metrics.topology_valid.set(1)  # the topology we start with is valid
        for name in topology.clusters:
            self.metrics.init_cluster(name)
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
                down_after=h.window,
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
        self._misconfigured: dict[str, str] = {}
        self._unreachable: set[str] = set()  # clusters this replica's own probes see DOWN
        self._mis_lock = threading.Lock()  # destination threads report under it; never waits
        self._tick_timeout = tick_timeout
        self._lag = LagReader(
            CurrentAdmin(lambda: self._kafka),
            interval=lag_interval,
            fast_interval=tick,
            read_timeout=lag_timeout,
            peek=lambda wanted, timeout: self._kafka.admin.timestamps(wanted, timeout=timeout),
        )
        self._guards = Guards()  # one per route, shared by its destinations (router.guard)
        self.metrics.watch_guards(self._guards.stats)
        self._factory = destinations or self.build_destination
        # destinations built here own partitions through a route membership (readiness
        # waits for it); injected ones (tests) have none
        self._memberships_own = destinations is None
        self._control = ControlLoop(
            views=self.cluster_views,
            lag=self._lag,
            build=self._factory,
            metrics=self.metrics,
            tick=tick,
            lag_max_age=3 * lag_interval + lag_timeout,
            stall_after=stall_after,
        )
        self._rebuilder = Rebuilder(
            self._control, build=self._build_route, on_change=self._routes_moved
        )
        self._reloader = Reloader(
            path=Path(topology_path) if topology_path else None,
            load=functools.partial(load_topology, datacenter=datacenter),
            apply=self._apply_now,
            rebuilder=self._rebuilder,
            metrics=self.metrics,
            interval=tick,
            each_pass=self._watch_kafka_secrets,
        )
        # clusters that refused writes (401/403, unknown database) are probed until they work
        self._reprober = Reprober(
            probe=self._probe, on_recovered=self._on_recovered, version=self._secret_version
        )
        self.verdicts.subscribe(self._on_verdict)
        self._stopping = threading.Event()
        # route -> who owns which of its partitions on this replica (reload thread builds and
        # retires them; the control thread reads them when it rebuilds a crashed destination)
        self._memberships: dict[str, RouteMembership] = {}
        self._memberships_lock = threading.Lock()
        self.started_at = time.time()

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self.shared is not None:
            self.shared.start()  # starts the local checker too
        elif self._own_health is not None:
            self._own_health.start()
        self._rebuilder.plan(self._plans(self.topology), reason="router started")
        self._rebuilder.advance()  # no old consumers yet: every route starts now
        log.info(
            "router_started",
            datacenter=self.topology.datacenter,
            routes=len(self.topology.routes),
            clusters=len(self.topology.clusters),
        )
        self._lag.start()
        self._control.start()
        self._reloader.start()
        self._reprober.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop deciding, then stop every destination: finish in-flight writes, commit, leave
        the groups."""
        log.info("router_stopping", reason="stop requested")
        self._stopping.set()
        self._reprober.stop()
        self._reloader.stop()
        self._control.stop()
        self._lag.stop()
        routes = self._control.detach_all()
        dests = [d for rt in routes for d in rt.destinations.values()]
        self._stop_destinations(dests + self._rebuilder.leaving(), timeout)
        with self._memberships_lock:  # leave the route groups only after every commit
            memberships, self._memberships = list(self._memberships.values()), {}
        for m in memberships:
            m.stop()
        if self.shared is not None:
            self.shared.stop()  # releases the lock, deregisters, stops the local checker
        elif self._own_health is not None:
            self._own_health.stop()
        self._kafka.close()
        self._retired_kafka.close_all()

    # --- the Kafka clients (reload thread) ----------------------------------------------

    @property
    def _kafka_config(self) -> dict[str, str]:
        return self._kafka.config

    @property
    def _admin(self) -> KafkaAdmin:
        return self._kafka.admin

    @property
    def _dlq(self) -> DeadLetterProducer:
        return self._kafka.dead_letters

    def _plans(self, topology: Topology) -> list[RoutePlan]:
        """The route plans, tied to the current Kafka clients: after a rebuild of the clients
        (a rotated Kafka secret, the section unchanged) every plan is new, so every route
        moves to the new clients."""
        generation = self._kafka.generation
        return [
            dataclasses.replace(p, fingerprint=f"{p.fingerprint}.kafka{generation}")
            for p in plans_of(topology)
        ]

    def _use_kafka(self, new: Topology) -> tuple[Topology, KafkaClients | None]:
        """Build new Kafka clients if ``new``'s kafka: section, or one of its secrets, differs
        from the current clients'; return (the topology to apply, the clients replaced).
        Clients that cannot be built leave the previous section in place (reported)."""
        current = self._kafka
        try:
            if current.matches(new.kafka):
                self._kafka_error = ""  # e.g. a refused section reverted
                self._kafka_refused = None
                return new, None
            fresh = KafkaClients.build(new.kafka, current.generation + 1)
            self._check_kafka(fresh, new)
        except RouterError as exc:
            self._kafka_error = f"kafka: {exc}; still using the previous kafka settings"
            self.metrics.topology_valid.set(0)
            log.error(
                "kafka_clients_failed",
                error=str(exc),
                reason="the kafka section cannot be applied; still using the previous one",
            )
            return new.model_copy(update={"kafka": self.topology.kafka}), None
        self._kafka = fresh
        if self._kafka_error:  # the previous failure is over
            self._kafka_failure_over()
        self._kafka_refused = None
        log.warning(
            "kafka_clients_rebuilt",
            generation=fresh.generation,
            bootstrap=new.kafka.bootstrap,
            dead_letter_topic=new.kafka.dead_letters,
            reason="kafka settings or secrets changed; every route moves to the new clients",
        )
        return new, current

    def _check_kafka(self, fresh: KafkaClients, new: Topology) -> None:
        """Reload thread: may the new clients replace the current ones? Raises KafkaRefused
        (and closes them) when the brokers refuse their credentials or TLS; a Kafka that does
        not answer within the check's deadline is no reason to refuse them."""
        try:
            fresh.check(datacenter=new.datacenter, timeout=self._kafka_check_timeout)
        except RouterError as exc:
            fresh.close()
            if isinstance(exc, KafkaRefused):
                self._kafka_refused = (new.kafka, fresh.resolved)
                log.error(
                    "kafka_refused",
                    bootstrap=new.kafka.bootstrap,
                    reason="new kafka settings refused by the brokers; the previous ones stay",
                    **exc.fields(),
                )
            raise

    def _revive_memberships(self) -> None:
        """Reload thread, every pass: a route membership whose thread ended (a fatal consumer
        error) is replaced by a new one that its destinations' sources join."""
        with self._memberships_lock:
            dead = [(r, m) for r, m in self._memberships.items() if m.started and not m.alive]
        for route, old in dead:
            fresh = RouteMembership(route, old.group, old.topics, self._kafka_config)
            for member in old.detach_all():
                fresh.attach(member)
            with self._memberships_lock:
                self._memberships[route] = fresh
            log.error("membership_rebuilt", route=route, reason=old.error or "thread ended")
            fresh.start()

    def _watch_kafka_secrets(self) -> None:
        """Reload thread, every pass: a Kafka secret or TLS file rotated under an unchanged
        kafka: section (a SASL password file, a CA bundle, a client certificate) is applied like
        a change of the section. A rotation the brokers refused is not tried again until the
        secret changes once more; put back, it clears."""
        self._revive_memberships()
        self._kafka.serve()  # librdkafka's queued log lines of the handles that never fetch
        self._retired_kafka.serve()
        refused = self._kafka_refused
        if self._kafka_error and (refused is None or refused[0] != self.topology.kafka):
            return  # an edit of the section failed: waits for the next edit of the topology
        try:
            wanted = resolve(self.topology.kafka)
        except ConfigError:
            return  # unreadable and never read: the clients keep what they have
        if refused is not None and wanted == refused[1]:
            return  # refused already (reported once)
        if self._kafka.same(self.topology.kafka, wanted):
            if refused is not None:  # the refused secret was put back
                self._kafka_failure_over()
                log.warning("kafka_clients_kept", reason="the refused kafka secret was reverted")
            return
        self._apply_now(self.topology, reason="kafka secret changed")

    def _kafka_failure_over(self) -> None:
        """A failed or refused kafka section is no longer in the way: forget it and let the
        topology-valid metric follow the file alone."""
        self._kafka_error = ""
        self._kafka_refused = None
        self.metrics.topology_valid.set(0 if self._reloader.error else 1)

    def _routes_moved(self) -> None:
        """After the rebuilder changed the routes run or the destinations leaving: the lag
        reader and offset readers follow, and replaced Kafka clients no destination uses any
        more are closed."""
        self._routes_changed()
        self._retired_kafka.reap(self._rebuilder.leaving())

    @staticmethod
    def _stop_destinations(dests: list[DestinationLike], timeout: float) -> None:
        threads = [threading.Thread(target=d.stop, args=(timeout,)) for d in dests]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- building -----------------------------------------------------------------------

    def build_destination(self, plan: RoutePlan, cluster: str) -> Destination:
        """The destination of one cluster of a route (not started)."""
        route = plan.config
        cfg = plan.clusters[cluster]
        spec = DestinationSpec(
            route=route.name,
            cluster=cluster,
            group=plan.groups[cluster],
            topics=route.topics,
            peer_groups=tuple(plan.groups[c] for c in route.destinations),
            max_points=route.batch.max_points,
            max_bytes=route.batch.max_bytes,
            linger=route.batch.linger,
            max_in_flight=route.batch.max_in_flight,
            write_deadline=write_deadline(cfg),
            graphite_templates=route.graphite_templates if route.format == "graphite" else (),
            stamp_missing=route.stamp_missing_timestamps,
            precision="ns" if route.format == "graphite" else cfg.precision,
            guard=self._guards.get(route.name, route.guard),
        )
        target = influx_target(cluster, cfg)
        if route.format == "graphite":  # converted lines carry nanosecond timestamps
            target = dataclasses.replace(target, precision="ns")
        sink = InfluxSink(
            target,
            nodes=functools.partial(self.verdicts.healthy_nodes, cluster),
            on_node_result=functools.partial(self.verdicts.report_write, cluster),
        )
        membership = self._membership(plan)
        source = AssignedSource(
            spec.group,
            f"frouter-{route.name}-{cluster}",
            self._kafka_config,
            on_close=membership.detach,
        )
        membership.attach(source)
        return Destination(
            spec,
            sink=sink,
            admin=self._admin,
            dead_letters=self._dlq,
            metrics=self.metrics,
            on_misconfigured=self._on_misconfigured,
            source=source,
        )

    def _membership(self, plan: RoutePlan) -> RouteMembership:
        """The route's membership, created (not started) on first use."""
        with self._memberships_lock:
            m = self._memberships.get(plan.name)
            if m is None:
                m = RouteMembership(
                    plan.name,
                    f"{plan.kafka.group_prefix}.{plan.name}",
                    plan.config.topics,
                    self._kafka_config,
                )
                self._memberships[plan.name] = m
            return m

    def _retire_membership(self, route: str) -> None:
        """Leave the route group of a route whose destinations are gone (reload thread)."""
        with self._memberships_lock:
            m = self._memberships.pop(route, None)
        if m is not None:
            if m.members:
                log.warning("membership_retired_with_members", route=route, members=m.members)
            m.stop()

    def _build_route(self, plan: RoutePlan) -> RouteRuntime:
        # The rebuilder starts a route only once its old destinations left their groups: the
        # old membership has nobody left to hand partitions to, so it leaves first.
        self._retire_membership(plan.name)
        self.metrics.init_route(plan.name, plan.config.destinations, plan.config.topics)
        dests = {c: self._factory(plan, c) for c in plan.config.destinations}
        for dest in dests.values():
            dest.start()
        with self._memberships_lock:
            membership = self._memberships.get(plan.name)
        if membership is not None and not membership.alive:
            membership.start()
        return RouteRuntime(plan, dests)

    def _routes_changed(self) -> None:
        """The routes run or the groups in use changed: read the lag of the running routes,
        close the offset readers of groups gone."""
        plans = self._control.plans()
        with self._memberships_lock:
            idle = [r for r, m in self._memberships.items() if r not in plans and not m.members]
        for route in idle:  # a removed route whose destinations have all left
            self._retire_membership(route)
        self._lag.watch(p.watch() for p in plans.values())
        closed = self._admin.retain(groups_in_use(plans, self._rebuilder))
        if closed:
            log.info("offset_readers_closed", groups=",".join(closed))

    # --- cluster views (control thread) -------------------------------------------------

    def _on_verdict(self, old: Verdict, new: Verdict) -> None:
        self._control.wake()

    def _on_misconfigured(self, cluster: str, why: str) -> None:
        # Called from a destination thread, maybe while the engine waits for it: own lock.
        with self._mis_lock:
            self._misconfigured[cluster] = why
        self._reprober.add(cluster, why)
        self._control.wake()

    def _probe(self, cluster: str) -> None:
        """Reprobe thread: an empty write with the cluster's credentials as they are now;
        raises SinkMisconfigured while it is still refused."""
        cfg = self.topology.clusters.get(cluster)
        if cfg is None:
            return  # gone from the topology: nothing refuses any more
        target = dataclasses.replace(influx_target(cluster, cfg), max_retries=0)
        with InfluxSink(target, nodes=functools.partial(self._probe_nodes, cluster)) as sink:
            sink.probe()

    def _probe_nodes(self, cluster: str) -> list[str]:
        try:
            return list(self.verdicts.healthy_nodes(cluster))
        except KeyError:
            return []

    def _secret_version(self, cluster: str) -> object:
        cfg = self.topology.clusters.get(cluster)
        return secret_version(cfg) if cfg is not None else None

    def _on_recovered(self, cluster: str) -> None:
        """Reprobe thread: the cluster accepts writes again. It is usable from the next pass:
        the policy activates its destinations (a stopped one resumes) and routes hand back."""
        with self._mis_lock:
            why = self._misconfigured.pop(cluster, None)
        for route in self.topology.routes:
            if cluster in route.destinations:
                self.metrics.sink_misconfigured.labels(route=route.name, cluster=cluster).set(0)
        log.warning(
            "sink_recovered",
            cluster=cluster,
            was=why or "",
            reason="a probe write with the current credentials was accepted",
        )
        self._control.wake()

    def _drained(self, name: str) -> bool:
        """The topology's flag OR the Consul KV override: either one drains."""
        kv = self.shared is not None and self.shared.drained(name)
        cfg = self.topology.clusters.get(name)
        return (cfg is not None and cfg.drain) or kv

    def cluster_views(self) -> dict[str, ClusterView] | None:
        """What every cluster looks like to the policy now; None while Consul discovery has
        not answered yet (no decision on empty node lists)."""
        if self.shared is not None and not self.shared.ready():
            return None
        views = {}
        with self._mis_lock:
            misconfigured = dict(self._misconfigured)
        for name in self.topology.clusters:
            try:
                v = self.verdicts.verdict(name)
            except KeyError:  # removed by a reload a moment ago; no running route names it
                continue
            up = self._reachable(name, v)
            healthy = up and name not in misconfigured
            reason = misconfigured.get(name, "" if up else self._down_reason(name, v))
            drained = self._drained(name)
            views[name] = ClusterView(healthy=healthy, drained=drained, reason=reason)
            self.metrics.cluster_up.labels(cluster=name).set(1 if healthy else 0)
            if self.shared is None:  # no shared verdict: this replica's probes are the verdict
                up = v.state is ClusterState.UP
                self.metrics.cluster_reachable.labels(cluster=name).set(1 if up else 0)
            self.metrics.cluster_drained.labels(cluster=name).set(1 if drained else 0)
        self._publish_consul_metrics()
        return views

    def _reachable(self, name: str, shared: Verdict) -> bool:
        """Whether this replica routes the partitions it owns to the cluster.

        Every destination of a partition lives in the replica that owns it (route membership),
        so this replica's own probes decide for its partitions: a network path that fails for
        one replica moves that replica's partitions only, whichever replica holds the Consul
        lock. The shared verdict stays what the datacenter's status shows; when this replica
        sees the cluster differently, it says so (event ``cluster_reachability``).
        """
        local = self._own_health
        if self.shared is None or local is None:
            return shared.state is ClusterState.UP
        try:
            mine = local.verdict(name)
        except KeyError:
            return shared.state is ClusterState.UP
        ok = mine.state is ClusterState.UP
        self.metrics.cluster_reachable.labels(cluster=name).set(1 if ok else 0)
        if ok == (name in self._unreachable):
            if ok:
                self._unreachable.discard(name)
            else:
                self._unreachable.add(name)
            log.warning(
                "cluster_reachability",
                cluster=name,
                reachable=ok,
                shared_state=shared.state.value,
                replica=self.shared.replica,
                reason=mine.reason or "probes of this replica",
            )
        return ok

    def _down_reason(self, name: str, shared: Verdict) -> str:
        local = self._own_health
        if self.shared is not None and local is not None and name in self._unreachable:
            with contextlib.suppress(KeyError):  # removed by a reload meanwhile
                return f"unreachable from this replica: {local.verdict(name).reason}"
        return shared.reason

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

    # --- topology reload (reload thread) ------------------------------------------------

    def apply(self, new: Topology) -> None:
        """Move to a new valid topology without a restart (carried out on the reload thread;
        this returns at once)."""
        self._reloader.submit(new)

    def _apply_now(self, new: Topology, reason: str = "topology changed") -> None:
        old = self.topology
        new, replaced = self._use_kafka(new)
        changed_clusters = {
            n
            for n, c in new.clusters.items()
            if n not in old.clusters
            or old.clusters[n].model_dump(exclude={"drain"}) != c.model_dump(exclude={"drain"})
        }
        # Stale routes leave the control loop first: no route it still runs ever meets a
        # cluster the new topology lacks. New ones start in advance(), after the swap below.
        rebuilt = self._rebuilder.plan(self._plans(new), reason=reason)
        if replaced is not None:  # closed once every destination built with it has left
            self._retired_kafka.add(replaced, self._rebuilder.leaving())
            self._retired_kafka.reap(self._rebuilder.leaving())
        with self._mis_lock:
            for n in changed_clusters:
                self._misconfigured.pop(n, None)
        for n in changed_clusters:  # rebuilt from the new entry: judged by its own writes
            self._reprober.discard(n)
        if self.shared is not None:
            self.shared.set_sources(cluster_sources(new))
        elif self._own_health is not None:
            self._own_health.update(health_specs(new))
        self.topology = new
        for n in new.clusters:
            self.metrics.init_cluster(n)
        drains = sorted(n for n, c in new.clusters.items() if c.drain)
        log.info(
            "topology_reloaded",
            reason=reason,
            routes=len(new.routes),
            rebuilt=len(rebuilt),
            drained=",".join(drains) or "none",
        )
        self._control.wake()

    # --- observation (HTTP threads) -----------------------------------------------------

    @property
    def reload_error(self) -> str:
        return self._reloader.error or self._kafka_error

    @property
    def last_tick(self) -> float:
        return self._control.last_tick

    def readiness(self) -> str:
        """Why this replica is not ready, "" once it is (``/readyz``).

        Ready means: the policy has run, Consul discovery (if any) answered, and every route
        of the topology runs and holds its partitions: its membership received its assignment
        from the route group and every destination of the route has been assigned every
        partition the membership owns. An empty assignment (another replica owns every
        partition) counts once it stood for ``EMPTY_ASSIGNMENT_GRACE``: a joining replica's
        first assignment is empty and its partitions come in a second round. A rebalance that
        gives partitions, a lost assignment or a rebuilt route makes the replica not ready
        until it holds them. Built from snapshots: never waits on I/O (docs/operations.md,
        "Readiness").
        """
        if self._stopping.is_set():
            return "stopping"
        if not self.last_tick:
            return "the control loop has not run yet"
        if self.shared is not None and not self.shared.ready():
            return "waiting for Consul to list the nodes of every cluster"
        running = self._control.snapshots()
        with self._memberships_lock:
            memberships = dict(self._memberships)
        for route in self.topology.routes:
            snap = running.get(route.name)
            if snap is None:
                return f"route {route.name}: not running yet (starting or being rebuilt)"
            why = self._route_unready(snap, memberships.get(route.name))
            if why:
                return f"route {route.name}: {why}"
        return ""

    def _route_unready(self, snap: status.RouteSnapshot, m: RouteMembership | None) -> str:
        if m is None:  # destinations injected (tests): nothing owns partitions
            return "no route membership" if self._memberships_own else ""
        if not m.alive:
            return f"its membership of group {m.group} is not running"
        return status.route_unready(
            m.group, m.ownership(), snap.destinations, EMPTY_ASSIGNMENT_GRACE
        )

    def _routes(self) -> list[status.RouteSnapshot]:
        return status.ordered(self.topology, self._control.snapshots(), self._rebuilder.snapshots())

    def _problems(self, routes: list[status.RouteSnapshot]) -> list[str]:
        if self._stopping.is_set():
            return []  # stopping on purpose: the loop ends, destinations flush
        last = self.last_tick
        with self._memberships_lock:
            dead = [
                f"{r}: route membership ended ({m.error or 'thread ended'})"
                for r, m in self._memberships.items()
                if m.started and not m.alive
            ]
        return dead + status.health_problems(
            routes,
            loop_alive=self._control.running,
            tick_age=time.time() - last if last else None,
            tick_timeout=self._tick_timeout,
        )

    def health(self) -> tuple[str, list[str]]:
        """(why /healthz fails, "" when healthy; warnings worth a look although healthy)."""
        routes = self._routes()
        return status.one_line(self._problems(routes)), status.health_warnings(routes)

    def status(self) -> dict[str, Any]:
        topology = self.topology
        with self._mis_lock:
            misconfigured = dict(self._misconfigured)
        routes = self._routes()
        shared = self.shared
        verdict = {
            "source": shared.source if shared is not None else "local",
            "consul": shared is not None,
            "replica": shared.replica if shared is not None else "",
            "leader": shared.leader if shared is not None else "",
            "is_leader": shared.is_leader if shared is not None else False,
        }
        last = self.last_tick
        problems = self._problems(routes)
        m = self.metrics
        totals = status.counter_totals(
            {
                "dead_letters": m.dead_letters,
                "retention_lost": m.retention_lost,
                "skipped": m.skipped,
                "failovers": m.failovers,
            }
        )
        return {
            "datacenter": topology.datacenter,
            "verdict": verdict,
            "started_at": self.started_at,
            "topology_error": self.reload_error,
            "control": {
                "last_tick": last,
                "tick_age": round(time.time() - last, 2) if last else None,
                "lag_read_age": round(time.monotonic() - self._lag.last_pass, 1)
                if self._lag.last_pass
                else None,
            },
            "healthy": not problems,
            "problems": problems,
            "warnings": status.health_warnings(routes),
            "clusters": status.clusters_json(topology, self.verdicts, self._drained, misconfigured),
            "totals": status.grand_totals(totals),
            "routes": [status.route_json(r, totals) for r in routes],
            "guards": self._guards.status(),
        }

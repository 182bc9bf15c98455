"""One verdict per datacenter, shared through Consul; discovery; drain overrides in KV.

Every replica keeps probing on its own (``HealthChecker``: the *local* verdict). With Consul:

- one replica holds the session lock ``{prefix}/{dc}/leader``; its session is bound to the
  replica's own service check (HTTP on /healthz) and to the agent's serfHealth, with a TTL and
  no lock delay, so a dead leader (even after kill -9) loses the lock within about one check
  interval, and a hung one within the TTL;
- the leader publishes its local verdict of every cluster to ``{prefix}/{dc}/clusters/{name}``
  (JSON: state, since, reason, leader); followers read them with blocking queries and act on
  them instead of their own, so every replica fails over the same partitions;
- ``{prefix}/{dc}/drain/{cluster}`` = true drains a cluster (ORed with the topology's flag);
- a cluster given as ``consul_service`` gets its nodes from the service's *passing* instances
  (blocking queries): an instance that fails its Consul check leaves the node list.

When Consul cannot be reached, each replica falls back to its local verdict (event
``verdict_source``, ``source`` property) and returns to the shared one when Consul answers.
Discovered node lists are kept as they were last seen while Consul is away.

With ACLs, a call Consul refuses (403: no token, an unknown token, a policy that lacks the
permission) is one ``consul_permission_denied`` event per kind of call (``op``: register,
election, watch, discovery), naming the token's source and the missing permission, and the
replica decides on its local verdict until every refused kind of call works again (a rotated
token file, a fixed policy): ``consul_permission_granted``, then ``verdict_source`` back to
shared. Refused calls are counted (``consul_errors``) but never logged again one by one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import structlog

from health.checker import ClusterSpec, HealthChecker
from health.consul import ConsulAPI, ConsulSettings, decode, encode
from health.verdict import ClusterState, Subscriber, Verdict
from router.errors import ConsulDenied, ConsulError
from router.tls import TlsSettings

log = structlog.get_logger("health")

TRUE_WORDS = frozenset({"1", "true", "yes", "on", "drain", "drained"})


@dataclass(frozen=True)
class DiscoverySpec:
    service: str
    tag: str | None = None
    datacenter: str | None = None


@dataclass(frozen=True)
class ClusterSource:
    """How the shared verdict learns a cluster's nodes: fixed URLs or a Consul service."""

    api: str
    min_healthy: int
    urls: tuple[str, ...] = ()
    discovery: DiscoverySpec | None = None
    flavor: Literal["influxdb", "victoriametrics"] = "influxdb"
    tls: TlsSettings | None = None  # the cluster's https settings (router.tls)


@dataclass
class _KVState:
    leader: str = ""  # replica id holding the lock ("" = nobody)
    clusters: dict[str, Verdict] = field(default_factory=dict)
    drains: frozenset[str] = frozenset()


def _truthy(raw: bytes) -> bool:
    return raw.decode(errors="replace").strip().lower() in TRUE_WORDS


def replica_id(datacenter: str, port: int) -> str:
    return f"failover-router-{datacenter}-{socket.gethostname()}-{os.getpid()}-{port}"


class SharedVerdict:
    """A VerdictSource (and drain source) backed by Consul, falling back to local probes."""

    def __init__(
        self,
        settings: ConsulSettings,
        local: HealthChecker,
        sources: Mapping[str, ClusterSource],
        *,
        datacenter: str,
        replica: str,
        api: ConsulAPI | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.replica = replica
        self.datacenter = datacenter
        self._api = api or ConsulAPI(settings)
        self._local = local
        self._clock = clock
        self._base = f"{settings.prefix.strip('/')}/{datacenter}"
        self._leader_key = f"{self._base}/leader"
        self._lock = threading.RLock()
        self._sources: dict[str, ClusterSource] = dict(sources)
        self._discovered: dict[str, tuple[str, ...]] = {}
        self._answered: set[str] = set()  # clusters whose discovery answered at least once
        self._started_at = clock()
        self._kv_seen: dict[str, tuple[float, float]] = {}  # cluster -> (published, seen at)
        self._kv = _KVState()
        self._consul_ok = True  # the shared verdict is used: watch answers, nothing denied
        self._watch_ok = True
        self._denied: set[str] = set()  # kinds of call Consul refuses (403)
        self._is_leader = False
        self._session: str | None = None
        self._check_id: str | None = None
        self._published: dict[str, tuple[str, float, str]] = {}
        self._effective: dict[str, Verdict] = {}
        self._subscribers: list[Subscriber] = []
        self._stop = threading.Event()
        self._wake_elector = threading.Event()
        self._threads: list[threading.Thread] = []
        self._discovery_threads: dict[str, tuple[DiscoverySpec, threading.Event]] = {}
        self.leader_changes = 0
        self.consul_errors = 0
        local.subscribe(self._on_local)
        self._apply_specs()

    # --- VerdictSource ------------------------------------------------------------------

    def verdict(self, cluster: str) -> Verdict:
        with self._lock:
            return self._compute(cluster)

    def healthy_nodes(self, cluster: str) -> list[str]:
        return self._local.healthy_nodes(cluster)

    def subscribe(self, callback: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def report_write(self, cluster: str, node: str, ok: bool) -> None:
        self._local.report_write(cluster, node, ok)

    def drained(self, cluster: str) -> bool:
        with self._lock:
            return cluster in self._kv.drains

    # --- what the status page and metrics show ------------------------------------------

    @property
    def source(self) -> str:
        """ "shared" while Consul answers, "local" while each replica decides alone."""
        return "shared" if self._consul_ok else "local"

    @property
    def is_leader(self) -> bool:
        return self._is_leader and self._consul_ok

    @property
    def leader(self) -> str:
        return self._kv.leader

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._local.start()
        self._register()
        for target, name in ((self._elect_loop, "consul-elect"), (self._watch_loop, "consul-kv")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._sync_discovery()

    def stop(self) -> None:
        """Give up the lock and the registration first, so others take over at once."""
        self._stop.set()
        self._wake_elector.set()
        for _spec, halt in self._discovery_threads.values():
            halt.set()
        try:
            if self._session is not None:
                if self._is_leader:
                    self._api.release(self._leader_key, self._session)
                self._api.destroy_session(self._session)
            self._api.deregister_self(self.replica)
        except ConsulError as exc:
            log.warning("consul_error", op="stop", error=str(exc))
        for t in self._threads:
            t.join(15)
        self._local.stop()

    def set_sources(self, sources: Mapping[str, ClusterSource]) -> None:
        """Topology reload: clusters and their node sources changed."""
        with self._lock:
            self._sources = dict(sources)
            self._discovered = {k: v for k, v in self._discovered.items() if k in sources}
        self._apply_specs()
        self._sync_discovery()
        self._recompute()

    # --- node lists ---------------------------------------------------------------------

    def _apply_specs(self) -> None:
        with self._lock:
            specs = {
                name: ClusterSpec(
                    api="v2" if src.api == "v2" else "v1",
                    nodes=src.urls if src.discovery is None else self._discovered.get(name, ()),
                    min_healthy=src.min_healthy,
                    flavor=src.flavor,
                    tls=src.tls,
                )
                for name, src in self._sources.items()
            }
        self._local.update(specs)

    def _sync_discovery(self) -> None:
        wanted = {n: s.discovery for n, s in self._sources.items() if s.discovery is not None}
        for name, (spec, halt) in list(self._discovery_threads.items()):
            if wanted.get(name) != spec:
                halt.set()
                del self._discovery_threads[name]
        for name, spec in wanted.items():
            if name not in self._discovery_threads and not self._stop.is_set():
                halt = threading.Event()
                t = threading.Thread(
                    target=self._discover_loop,
                    args=(name, spec, halt),
                    name=f"consul-discover-{name}",
                    daemon=True,
                )
                self._discovery_threads[name] = (spec, halt)
                t.start()

    def _discover_loop(self, cluster: str, spec: DiscoverySpec, halt: threading.Event) -> None:
        index: str | None = None
        while not halt.is_set() and not self._stop.is_set():
            try:
                index, urls = self._api.passing_instances(
                    spec.service, tag=spec.tag, dc=spec.datacenter, index=index, wait="5s"
                )
            except ConsulError as exc:
                self._call_failed("discovery", exc, cluster=cluster)
                index = None
                halt.wait(1.0)
                continue
            self._call_worked("discovery")
            with self._lock:
                if halt.is_set():
                    return  # a reload replaced this watch: its answer is stale
                self._answered.add(cluster)
                if urls is None:
                    if cluster not in self._discovered:
                        self._discovered[cluster] = ()
                    log.warning(
                        "discovery_empty",
                        cluster=cluster,
                        service=spec.service,
                        reason="no instance in the catalog; keeping the last node list",
                    )
                    continue
                nodes = tuple(urls)
                changed = self._discovered.get(cluster) != nodes
                self._discovered[cluster] = nodes
            if changed:
                log.info(
                    "nodes_discovered", cluster=cluster, service=spec.service, nodes=len(nodes)
                )
                self._apply_specs()

    # --- election and publishing --------------------------------------------------------

    def _register(self) -> None:
        host, _, port = self.settings.advertise.rpartition(":")
        try:
            self._check_id = self._api.register_self(
                self.replica,
                "failover-router",
                host or "127.0.0.1",
                int(port),
                [self.datacenter],
            )
            log.info("consul_registered", service_id=self.replica)
            self._call_worked("register")
        except ConsulError as exc:
            self._call_failed("register", exc)

    def _elect_loop(self) -> None:
        period = max(1.0, self.settings.session_ttl / 3)
        last_publish = 0.0
        while not self._stop.is_set():
            try:
                self._elect_once()
                if self._is_leader and (
                    self._clock() - last_publish >= self.settings.session_ttl / 2
                    or self._changed_since_publish()
                ):
                    self._publish()
                    last_publish = self._clock()
                self._call_worked("election")
            except ConsulError as exc:
                self._call_failed("election", exc)
                self._set_leader(False)  # cannot prove we hold the lock: stop publishing
            self._wake_elector.wait(0.5 if self._is_leader else period)
            self._wake_elector.clear()

    def _elect_once(self) -> None:
        if not self._api.is_registered(self.replica):
            self._register()  # e.g. the agent lost its state in a restart
            self._session = None
        else:
            self._call_worked("register")  # registered: a refusal of it is over
        if self._session is not None and not self._api.renew_session(self._session):
            self._session = None  # invalidated by Consul; a transport error keeps it (raises)
        if self._session is None:
            checks = ["serfHealth"] + ([self._check_id] if self._check_id else [])
            self._session = self._api.create_session(
                self.replica, self.settings.session_ttl, checks
            )
        won = self._api.acquire(self._leader_key, self._session, encode({"replica": self.replica}))
        self._set_leader(won)

    def _set_leader(self, leader: bool) -> None:
        if leader != self._is_leader:
            self._is_leader = leader
            log.warning(
                "leadership",
                replica=self.replica,
                from_state="leader" if not leader else "follower",
                to_state="leader" if leader else "follower",
                reason="acquired the lock" if leader else "lost the lock",
            )
            self._recompute()

    def _changed_since_publish(self) -> bool:
        with self._lock:
            names = list(self._sources)
        for name in names:
            v = self._local.verdict(name)
            if self._published.get(name) != (v.state.value, v.since, v.reason):
                return True
        return False

    def _publish(self) -> None:
        with self._lock:
            names = list(self._sources)
        for name in names:
            v = self._local.verdict(name)
            doc = {
                "state": v.state.value,
                "since": v.since,
                "reason": v.reason,
                "leader": self.replica,
                "published": self._clock(),
            }
            self._api.put(f"{self._base}/clusters/{name}", encode(doc))
            self._published[name] = (v.state.value, v.since, v.reason)

    # --- following ----------------------------------------------------------------------

    def _watch_loop(self) -> None:
        index: str | None = None
        while not self._stop.is_set():
            try:
                index, entries = self._api.get_prefix(f"{self._base}/", index=index, wait="5s")
            except ConsulError as exc:
                self._consul_failed("watch", exc)
                index = None
                self._stop.wait(1.0)
                continue
            self._consul_answered()
            now = self._clock()
            state = _KVState()
            drains = set()
            for e in entries:
                rel = e.key[len(self._base) + 1 :]
                if rel == "leader":
                    if e.session:
                        state.leader = str(decode(e.value).get("replica", ""))
                elif rel.startswith("clusters/"):
                    doc = decode(e.value)
                    name = rel.removeprefix("clusters/")
                    if doc.get("state") in ("up", "down"):
                        published = float(doc.get("published", 0.0))
                        seen = self._kv_seen.get(name)
                        if seen is None or seen[0] != published:
                            self._kv_seen[name] = (published, now)
                        state.clusters[name] = Verdict(
                            cluster=name,
                            state=ClusterState(doc["state"]),
                            since=float(doc.get("since", 0.0)),
                            reason=str(doc.get("reason", "")),
                        )
                elif rel.startswith("drain/") and _truthy(e.value):
                    drains.add(rel.removeprefix("drain/"))
            state.drains = frozenset(drains)
            with self._lock:
                old = self._kv
                self._kv = state
            if old.leader != state.leader:
                self.leader_changes += 1
                log.warning(
                    "leader_change",
                    datacenter=self.datacenter,
                    from_leader=old.leader or "none",
                    to_leader=state.leader or "none",
                    reason="lock released" if not state.leader else "lock acquired",
                )
                if not state.leader:
                    self._wake_elector.set()  # the lock is free: try at once
            if old.drains != state.drains:
                log.warning(
                    "drain_override",
                    drained=",".join(sorted(state.drains)) or "none",
                    reason=f"KV {self._base}/drain/",
                )
            self._recompute()

    # --- the effective verdict ----------------------------------------------------------

    def _compute(self, cluster: str) -> Verdict:
        local = self._local.verdict(cluster)
        if not self._consul_ok or self._is_leader:
            return local
        shared = self._kv.clusters.get(cluster)
        seen = self._kv_seen.get(cluster)
        # The leader republishes every TTL/2: a value not refreshed for 2 TTLs has no leader
        # behind it (lock stuck, leader gone) and must not freeze the route.
        fresh = seen is not None and self._clock() - seen[1] < 2 * self.settings.session_ttl
        return shared if shared is not None and fresh else local

    def ready(self) -> bool:
        """True once every Consul-discovered cluster has had an answer (or after 10 s), so the
        router does not fail over at start-up just because discovery has not answered yet."""
        with self._lock:
            wanted = {n for n, s in self._sources.items() if s.discovery is not None}
            return wanted <= self._answered or self._clock() - self._started_at > 10.0

    def _on_local(self, _old: Verdict, _new: Verdict) -> None:
        if self._is_leader:
            self._wake_elector.set()  # publish now
        self._recompute()

    def _recompute(self) -> None:
        fire: list[tuple[Verdict, Verdict]] = []
        with self._lock:
            for name in self._sources:
                try:
                    new = self._compute(name)
                except KeyError:
                    continue
                old = self._effective.get(name)
                self._effective[name] = new
                if old is not None and old.state != new.state:
                    fire.append((old, new))
            subscribers = list(self._subscribers)
        for old, new in fire:
            for cb in subscribers:
                cb(old, new)

    def _consul_failed(self, op: str, exc: ConsulError) -> None:
        """The KV watch failed: the shared verdict cannot be read."""
        self._watch_ok = False
        if isinstance(exc, ConsulDenied):
            self._call_failed(op, exc)
        else:
            self.consul_errors += 1
            self._set_source(f"consul unreachable ({op}): {exc}")

    def _consul_answered(self) -> None:
        self._watch_ok = True
        self._call_worked("watch")
        self._set_source("consul answers again")

    def _call_failed(self, op: str, exc: ConsulError, **fields: str) -> None:
        """Count a failed call; a refusal (403) is said once per kind of call and makes this
        replica decide on its local verdict until that kind of call works again."""
        self.consul_errors += 1
        if not isinstance(exc, ConsulDenied):
            log.warning("consul_error", op=op, error=str(exc), **fields)
            return
        with self._lock:
            first = op not in self._denied
            self._denied.add(op)
        if first:
            log.error(
                "consul_permission_denied",
                op=op,
                reason=str(exc),
                hint="give the router's token the policy in docs/operations.md (Security)",
                **fields,
            )
        self._set_source(str(exc))

    def _call_worked(self, op: str) -> None:
        with self._lock:
            was = op in self._denied
            self._denied.discard(op)
        if was:
            log.warning("consul_permission_granted", op=op, reason="Consul accepts the call again")
            self._set_source(f"consul accepts {op} again")

    def _set_source(self, reason: str) -> None:
        """Shared while the watch answers and no kind of call is refused; else local."""
        with self._lock:
            ok = self._watch_ok and not self._denied
            if ok == self._consul_ok:
                return
            self._consul_ok = ok
        log.log(
            logging.WARNING if ok else logging.ERROR,
            "verdict_source",
            from_state="local" if ok else "shared",
            to_state="shared" if ok else "local",
            reason=reason,
        )
        self._recompute()

"""The control loop: one thread ("control") that applies the failover policy to every route.

Each pass (every ``tick`` seconds, or at once after ``wake``: a verdict changed) takes the cluster
views (health verdicts, drain flags) and, for every route attached to it:

1. rebuilds a destination whose consumer thread ended (``crashed``), once it left its group;
2. lets a graceful deactivation finish (without waiting for it) before the next cluster starts;
3. asks ``policy.decide`` what to do, with the primary group's lag from the lag reader's latest
   reading. A reading older than ``lag_max_age``, or taken before the primary resumed, counts
   as not known: it never triggers a hand-back, the standby stays;
4. carries out the actions: queue puts on the destinations, never a wait;
5. watches for stalls, sets the destination gauges and publishes a ``RouteSnapshot``.

A lag-read error never skips a route: decisions on health never wait for Kafka.

Threads and locks: ``_lock`` guards the table of attached routes. The control thread holds it
for one pass, which does no blocking I/O (no Kafka call, no wait on a destination; building a
destination creates client handles, it does not connect). The reload thread takes it to
attach or detach a route between two passes. The status page and /healthz never take it: they
read the published snapshots.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from router.destination import DestinationSpec, DestinationStatus
from router.errors import RouterError
from router.lag import GroupLag, RouteLag, StallWatch, Watch
from router.metrics import DESTINATION_STATES, Metrics
from router.offsets import TopicPart
from router.policy import Action, ClusterView, Deactivate, RouteView, StartFrom, decide
from router.status import (
    DestinationView,
    PartitionView,
    Rate,
    RouteSnapshot,
    tp_name,
)
from router.topology import ClusterConfig, KafkaConfig, RouteConfig, Topology
from router.worker import Worker

log = structlog.get_logger("router")


class DestinationLike(Protocol):
    """What the engine uses of a ``router.destination.Destination``."""

    @property
    def spec(self) -> DestinationSpec: ...
    @property
    def crashed(self) -> str: ...
    @property
    def status(self) -> DestinationStatus: ...
    def start(self) -> None: ...
    def activate(self, start: StartFrom) -> None: ...
    def deactivate(self, graceful: bool, reason: str) -> threading.Event: ...
    def request_stop(self, graceful: bool = True) -> threading.Event: ...
    def stop(self, timeout: float = 60.0, graceful: bool = True) -> None: ...


class LagSource(Protocol):
    """What the control loop uses of the lag reader (``router.lag.LagReader``)."""

    def latest(self, route: str) -> RouteLag | None: ...
    def hurry(self, route: str, clusters: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class RoutePlan:
    """Everything a route's destinations are built from. Another fingerprint: rebuild them
    (drain flags are not part of it: a drain is a decision, not a rebuild)."""

    config: RouteConfig
    clusters: Mapping[str, ClusterConfig]  # the route's clusters
    kafka: KafkaConfig
    groups: Mapping[str, str]  # cluster -> destination group
    fingerprint: str

    @classmethod
    def of(cls, route: RouteConfig, topology: Topology) -> RoutePlan:
        clusters = {c: topology.clusters[c] for c in route.destinations}
        raw = repr(
            (
                route.model_dump(),
                {c: cfg.model_dump(exclude={"drain"}) for c, cfg in clusters.items()},
                topology.kafka.model_dump(),
            )
        )
        return cls(
            config=route,
            clusters=clusters,
            kafka=topology.kafka,
            groups={c: topology.group_id(route.name, c) for c in route.destinations},
            fingerprint=hashlib.sha256(raw.encode()).hexdigest(),
        )

    @property
    def name(self) -> str:
        return self.config.name

    def watch(self) -> Watch:
        return Watch(self.config.name, self.config.topics, tuple(self.groups.items()))


DestinationFactory = Callable[[RoutePlan, str], DestinationLike]
"""Builds (does not start) the destination of one cluster of a route."""


@dataclass
class RouteRuntime:
    """A route the control loop runs. Touched by the control thread only while attached."""

    plan: RoutePlan
    destinations: dict[str, DestinationLike]
    active: set[str] = field(default_factory=set)
    activated_at: dict[str, float] = field(default_factory=dict)  # cluster -> monotonic time
    # graceful deactivations under way: cluster -> (done, deadline); the route waits for them
    waiting: dict[str, tuple[threading.Event, float]] = field(default_factory=dict)
    stalls: dict[str, StallWatch] = field(default_factory=dict)
    hurried: bool = False
    since: float = field(default_factory=time.time)
    rates: dict[str, Rate] = field(default_factory=dict)  # cluster -> points/s
    active_since: float = 0.0  # wall-clock time the active set last changed
    active_reason: str = "no decision yet"

    @property
    def config(self) -> RouteConfig:
        return self.plan.config


def route_view(route: RouteConfig) -> RouteView:
    return RouteView(
        name=route.name,
        mode=route.mode,
        destinations=route.destinations,
        skip_missed=route.skip_missed,
        handback_lag=route.handback_lag,
    )


class ControlLoop(Worker):
    def __init__(
        self,
        *,
        views: Callable[[], Mapping[str, ClusterView] | None],
        lag: LagSource,
        build: DestinationFactory,
        metrics: Metrics,
        tick: float = 0.25,
        lag_max_age: float = 6.0,
        stall_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``views`` returns the cluster views, or None while no decision may be taken yet
        (Consul discovery has not answered). ``stall_after`` overrides every destination's
        write deadline as the stall threshold (tests shorten it)."""
        self._views = views
        self._lag = lag
        self._build = build
        self._metrics = metrics
        self._tick = tick
        self._lag_max_age = lag_max_age
        self._stall_after = stall_after
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._routes: dict[str, RouteRuntime] = {}
        self._published: dict[str, RouteSnapshot] = {}
        Worker.__init__(self, "control")
        self.last_tick = 0.0  # wall-clock time of the last pass (0: none yet)

    # --- the route table (reload thread) ------------------------------------------------

    def attach(self, rt: RouteRuntime) -> None:
        """Run this route from the next pass on (its destinations are started)."""
        with self._lock:
            self._routes[rt.config.name] = rt
        self._wake.set()

    def detach(self, name: str) -> RouteRuntime | None:
        """Stop running the route; once this returns, the control thread never touches it."""
        with self._lock:
            rt = self._routes.pop(name, None)
            self._published = {n: s for n, s in self._published.items() if n != name}
        if rt is not None:
            self._forget_metrics(rt)
        return rt

    def detach_all(self) -> list[RouteRuntime]:
        with self._lock:
            names = list(self._routes)
        return [rt for rt in (self.detach(n) for n in names) if rt is not None]

    def plans(self) -> dict[str, RoutePlan]:
        with self._lock:
            return {name: rt.plan for name, rt in self._routes.items()}

    def snapshots(self) -> Mapping[str, RouteSnapshot]:
        """The routes as of the last pass (never waits)."""
        return self._published

    # --- the thread ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """False once the thread ended (stopped, or died of a bug: /healthz says so)."""
        return self._thread.is_alive() or not self._thread.ident

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(self._tick)
                self._wake.clear()
                if self._stop.is_set():
                    break
                self.tick()
        except Exception:
            log.exception("control_loop_crashed")  # /healthz fails from now on
            raise

    def tick(self) -> None:
        """One pass over every attached route."""
        views = self._views()
        now = self._clock()
        with self._lock:
            routes = list(self._routes.values())
            for rt in routes:
                if views is not None:
                    self._step(rt, views, now)
            published = {rt.config.name: self._snapshot(rt, now, views or {}) for rt in routes}
            self._published = published
        self.last_tick = self._wall()

    # --- one route ----------------------------------------------------------------------

    def _step(self, rt: RouteRuntime, views: Mapping[str, ClusterView], now: float) -> None:
        self._rebuild_crashed(rt)
        for cluster, (done, deadline) in list(rt.waiting.items()):
            if done.is_set():
                del rt.waiting[cluster]
            elif now >= deadline:
                del rt.waiting[cluster]
                log.warning(
                    "handoff_timeout",
                    route=rt.config.name,
                    cluster=cluster,
                    reason="graceful deactivation not done within the write deadline; "
                    "the next cluster starts anyway (duplicates possible, no loss)",
                )
        if not rt.waiting:
            self._decide(rt, views, now)
        self._hurry(rt)

    def _decide(self, rt: RouteRuntime, views: Mapping[str, ClusterView], now: float) -> None:
        route = route_view(rt.config)
        before = frozenset(rt.active)
        actions = decide(route, views, before, self._primary_lag(rt, now))
        try:
            self._carry_out(rt, route, views, actions, now)
        finally:
            if frozenset(rt.active) != before or not rt.active_since:
                rt.active_since = self._wall()
                rt.active_reason = active_reason(route, before, rt.active, actions, views)

    def _carry_out(
        self,
        rt: RouteRuntime,
        route: RouteView,
        views: Mapping[str, ClusterView],
        actions: list[Action],
        now: float,
    ) -> None:
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
                return  # activate on a later pass, once the graceful deactivation is done
            if action.start is StartFrom.TAKEOVER:
                from_cluster = next(
                    (
                        c
                        for c in route.destinations
                        if c != action.cluster and not views.get(c, ClusterView(False)).usable
                    ),
                    route.primary,
                )
                self._metrics.failovers.labels(route=route.name, cluster=action.cluster).inc()
                log.warning(
                    "failover",
                    route=route.name,
                    from_cluster=from_cluster,
                    to_cluster=action.cluster,
                    reason=action.reason,
                )
            dest.activate(action.start)
            rt.active.add(action.cluster)
            rt.activated_at[action.cluster] = now

    def _primary_lag(self, rt: RouteRuntime, now: float) -> int | None:
        """The primary group's lag if a fresh reading taken since it resumed says so."""
        if rt.config.mode != "failover":
            return None
        primary = rt.config.destinations[0]
        snap = self._lag.latest(rt.config.name)
        reading = snap.reading(primary, now, self._lag_max_age) if snap else None
        if reading is None or reading.read_at < rt.activated_at.get(primary, float("inf")):
            return None
        # Only the partitions this replica owns: the others are handed back by their owners.
        owned = set(rt.destinations[primary].status.assigned)
        return sum(n for tp, n in reading.lag.items() if tp in owned)

    def _hurry(self, rt: RouteRuntime) -> None:
        """A returning primary replays next to a standby: its lag decides the hand-back."""
        primary = rt.config.destinations[0]
        replaying = rt.config.mode == "failover" and primary in rt.active and len(rt.active) > 1
        if replaying != rt.hurried:
            self._lag.hurry(rt.config.name, (primary,) if replaying else ())
            rt.hurried = replaying

    def _rebuild_crashed(self, rt: RouteRuntime) -> None:
        for cluster, dest in list(rt.destinations.items()):
            if not dest.crashed:
                continue
            if not dest.request_stop(False).is_set():
                continue  # still leaving its group: never two consumers of one group at once
            try:
                new = self._build(rt.plan, cluster)
                new.start()
            except RouterError as exc:
                log.error(
                    "destination_rebuild_failed",
                    route=rt.config.name,
                    cluster=cluster,
                    error=str(exc),
                )
                continue  # tried again next pass; /healthz says the thread is dead meanwhile
            log.error(
                "destination_rebuilt",
                route=rt.config.name,
                cluster=cluster,
                reason=f"consumer thread ended: {dest.crashed}",
            )
            rt.destinations[cluster] = new
            rt.active.discard(cluster)  # the policy activates it again if it should be
            rt.waiting.pop(cluster, None)
            rt.stalls.pop(cluster, None)

    # --- what the pass shows --------------------------------------------------------------

    def _snapshot(
        self, rt: RouteRuntime, now: float, clusters: Mapping[str, ClusterView]
    ) -> RouteSnapshot:
        name = rt.config.name
        snap = self._lag.latest(name)
        wall = self._wall()
        views = []
        for cluster, dest in rt.destinations.items():
            st = dest.status
            reading = snap.groups.get(cluster) if snap is not None else None
            serving = cluster in rt.active
            watch = rt.stalls.get(cluster)
            if watch is None:
                after = self._stall_after
                watch = rt.stalls[cluster] = StallWatch(after or dest.spec.write_deadline)
            self._watch_stall(rt, cluster, watch, reading=reading, st=st, serving=serving)
            lag_seconds = reading.seconds(wall) if reading is not None else None
            self._publish_metrics(
                name, cluster, st, reading, stalled=bool(watch.stalled), lag_seconds=lag_seconds
            )
            rate = rt.rates.setdefault(cluster, Rate())
            views.append(
                DestinationView(
                    cluster=cluster,
                    status=st,
                    active=serving,
                    lag=reading.total if reading is not None else None,
                    lag_age=now - reading.read_at if reading is not None else None,
                    stalled=watch.stalled,
                    stalled_for=watch.stalled_for,
                    points_per_s=rate.update(now, st.points_written),
                    lag_seconds=lag_seconds,
                    partitions=partition_views(snap, reading, st, watch.stalled, wall),
                )
            )
        return RouteSnapshot(
            name=name,
            mode=rt.config.mode,
            topics=rt.config.topics,
            primary=rt.config.destinations[0],
            state="running",
            reason="",
            since=rt.since,
            active=tuple(c for c in rt.config.destinations if c in rt.active),
            destinations=tuple(views),
            handoff=tuple(sorted(rt.waiting)),
            lag_error=snap.error if snap is not None else "",
            active_since=rt.active_since,
            active_reason=rt.active_reason,
            usable=tuple(c for c in rt.config.destinations if c in clusters and clusters[c].usable),
        )

    def _watch_stall(
        self,
        rt: RouteRuntime,
        cluster: str,
        watch: StallWatch,
        *,
        reading: GroupLag | None,
        st: DestinationStatus,
        serving: bool,
    ) -> None:
        before = watch.stalled
        stalled = watch.update(reading, st.assigned, serving)
        if stalled and set(stalled) != set(before):
            log.error(
                "destination_stalled",
                route=rt.config.name,
                cluster=cluster,
                partitions=",".join(tp_name(tp) for tp in stalled),
                seconds=round(watch.stalled_for, 1),
                reason=f"lag > 0 but committed offsets unchanged for more than {watch.after:g}s",
            )
        elif before and not stalled:
            log.warning(
                "destination_unstalled",
                route=rt.config.name,
                cluster=cluster,
                reason="committed offsets move again" if serving else "no longer serving",
            )

    def _publish_metrics(
        self,
        route: str,
        cluster: str,
        st: DestinationStatus,
        reading: GroupLag | None,
        *,
        stalled: bool,
        lag_seconds: float | None = None,
    ) -> None:
        m = self._metrics
        labels = {"route": route, "cluster": cluster}
        m.oldest_unsettled.labels(**labels).set(st.oldest_unsettled)
        if lag_seconds is not None:
            m.consumer_lag_seconds.labels(**labels).set(lag_seconds)
        m.destination_stalled.labels(**labels).set(1 if stalled else 0)
        for state in {*DESTINATION_STATES, st.state}:
            m.destination_state.labels(**labels, state=state).set(1 if state == st.state else 0)
        if reading is not None:
            per_topic: dict[str, int] = {}
            for (topic, _p), n in reading.lag.items():
                per_topic[topic] = per_topic.get(topic, 0) + n
            for topic, n in per_topic.items():
                m.consumer_lag.labels(**labels, topic=topic).set(n)

    def _forget_metrics(self, rt: RouteRuntime) -> None:
        """A detached route's destination series go (its successor, if any, sets them again)."""
        m = self._metrics
        name = rt.config.name
        snap = self._lag.latest(name)
        for cluster, dest in rt.destinations.items():
            states = {*DESTINATION_STATES, dest.status.state}
            with contextlib.suppress(KeyError):
                m.oldest_unsettled.remove(name, cluster)
            with contextlib.suppress(KeyError):
                m.destination_stalled.remove(name, cluster)
            with contextlib.suppress(KeyError):
                m.consumer_lag_seconds.remove(name, cluster)
            for state in states:
                with contextlib.suppress(KeyError):
                    m.destination_state.remove(name, cluster, state)
            reading = snap.groups.get(cluster) if snap is not None else None
            for topic in {t for t, _p in reading.lag} if reading is not None else ():
                with contextlib.suppress(KeyError):
                    m.consumer_lag.remove(name, cluster, topic)


def partition_views(
    snap: RouteLag | None,
    reading: GroupLag | None,
    st: DestinationStatus,
    stalled: tuple[TopicPart, ...],
    wall: float,
) -> tuple[PartitionView, ...]:
    """Every partition of the route as one destination sees it (the per-partition table)."""
    parts = sorted({*(snap.partitions if snap is not None else ()), *st.assigned})
    marks = snap.marks if snap is not None else {}
    ages = reading.ages(wall) if reading is not None else {}
    assigned, paused, bad = set(st.assigned), set(st.paused), set(stalled)
    out = []
    for tp in parts:
        pos = reading.committed.get(tp) if reading is not None else None
        mark = marks.get(tp)
        out.append(
            PartitionView(
                tp=tp,
                committed=pos if pos is not None and pos >= 0 else None,
                end=mark.high if mark is not None else None,
                lag=reading.lag.get(tp) if reading is not None else None,
                lag_seconds=ages.get(tp),
                assigned=tp in assigned,
                paused=tp in paused,
                last_write=st.last_write.get(tp),
                stalled=tp in bad,
            )
        )
    return tuple(out)


def active_reason(  # noqa: PLR0911 (one answer per kind of change)
    route: RouteView,
    before: frozenset[str],
    after: Iterable[str],
    actions: Iterable[Action],
    views: Mapping[str, ClusterView],
) -> str:
    """Why the route's active set is what it is after a decision, in an operator's words."""
    now = [c for c in route.destinations if c in set(after)]
    acts = list(actions)
    if not now:
        down = [
            f"{c}: {views[c].reason or 'down'}" if c in views else f"{c}: unknown"
            for c in route.destinations
            if c not in views or not views[c].usable
        ]
        draining = [a.cluster for a in acts if isinstance(a, Deactivate) and a.graceful]
        if draining:
            return f"handing off: {', '.join(draining)} flushing ({acts[0].reason})"
        return "no usable cluster" + (f" ({'; '.join(down)})" if down else "")
    if route.mode == "mirror":
        return f"writing to {', '.join(now)}" + (f"; {acts[-1].reason}" if acts and before else "")
    primary = route.primary
    takeover = next(
        (a for a in acts if not isinstance(a, Deactivate) and a.start is StartFrom.TAKEOVER),
        None,
    )
    if takeover is not None:
        return f"failed over to {takeover.cluster}: {takeover.reason}"
    if not before and now == [primary]:
        return f"started on the primary {primary}"
    if primary in now and len(now) > 1:
        others = ", ".join(c for c in now if c != primary)
        return f"{primary} back: replaying its backlog while {others} keeps the stream"
    handback = next(
        (
            a
            for a in acts
            if isinstance(a, Deactivate) and a.cluster != primary and now == [primary]
        ),
        None,
    )
    if handback is not None:
        return f"handed back to {primary}: {handback.reason}"
    if acts:
        return acts[-1].reason
    return f"writing to {', '.join(now)}"

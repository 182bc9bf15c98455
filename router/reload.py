"""Topology reloads, carried out on their own thread ("reload"), never on the control thread.

``Reloader`` owns the thread. Every ``interval`` it hashes the topology file; a changed file is
validated, and a valid one handed to the router's ``apply`` (clusters, health sources, and a
plan for every route). An invalid one is reported (event, metric, status) and the router keeps
running on the last good topology. Topologies given to ``submit`` are applied the same way.
Then it lets the ``Rebuilder`` move on.

``Rebuilder`` moves routes from old destinations to new ones. A stale route (removed, or changed
in what its destinations are built from) is detached from the control loop at once, and each of
its destinations is asked to stop: flush, commit, leave the consumer group. A route's new
destinations are built and started only once no old destination of any of its groups is still
there, so two consumers of one group never commit at once and a commit never goes backwards.
An old destination that has not left within its deadline (write deadline + ``grace``) is
reported (event ``route_rebuild_stuck``, the route's status) and still waited for: its successor
never starts beside it. Meanwhile the control loop keeps deciding for every other route.

Threads: ``plan`` and ``advance`` are called from one thread (the reload thread; before it
starts, the router's own). ``snapshots`` may be called from any thread and never waits: it
reads a tuple the reload thread replaces.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from router.control import DestinationLike, RoutePlan, RouteRuntime
from router.errors import ConfigError, RouterError
from router.metrics import Metrics
from router.status import DestinationView, LeaveView, RouteSnapshot
from router.topology import Topology
from router.worker import Worker

log = structlog.get_logger("router")


class RouteTable(Protocol):
    """The routes the control loop runs (``router.control.ControlLoop``)."""

    def attach(self, rt: RouteRuntime) -> None: ...
    def detach(self, name: str) -> RouteRuntime | None: ...
    def plans(self) -> dict[str, RoutePlan]: ...


def request_stop(dest: DestinationLike) -> threading.Event:
    """Ask a destination to stop gracefully (flush, commit, leave its group); the event is set
    once its consumer left the group and its thread ended. Never blocks."""
    return dest.request_stop(True)


@dataclass
class _Leaving:
    route: str
    cluster: str
    dest: DestinationLike
    done: threading.Event
    started: float  # monotonic
    deadline: float  # seconds after ``started``
    reported: bool = False

    @property
    def group(self) -> str:
        return self.dest.spec.group


@dataclass
class _Pending:
    plan: RoutePlan
    since: float  # wall-clock time the route started waiting
    state: str  # "starting" (new route) or "rebuilding"
    retry_at: float = 0.0  # monotonic; after a failed build


@dataclass(frozen=True)
class _Shown:
    """One route as the status shows it while it moves (immutable, built by the reload thread)."""

    plan: RoutePlan
    state: str
    since: float
    reason: str
    leaving: tuple[_Leaving, ...] = field(default=())


class Rebuilder:
    def __init__(
        self,
        table: RouteTable,
        *,
        build: Callable[[RoutePlan], RouteRuntime],
        leave: Callable[[DestinationLike], threading.Event] = request_stop,
        on_change: Callable[[], None] = lambda: None,
        grace: float = 10.0,
        retry: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``build`` builds and starts a route's destinations; ``leave`` asks one to stop and
        returns an event set once it left its group; ``on_change`` is called after the table
        or the set of groups in use changed (lag reader, offset-reader handles)."""
        self._table = table
        self._build = build
        self._leave = leave
        self._on_change = on_change
        self._grace = grace
        self._retry = retry
        self._clock = clock
        self._wall = wall
        self._pending: dict[str, _Pending] = {}
        self._leaving: list[_Leaving] = []
        self._removing: dict[str, tuple[RoutePlan, float]] = {}  # route -> (old plan, since)
        self._shown: tuple[_Shown, ...] = ()

    # --- the reload thread ------------------------------------------------------------------

    def plan(self, wanted: Sequence[RoutePlan], reason: str = "topology changed") -> list[str]:
        """Make ``wanted`` the routes to run: detach the stale ones at once and ask their
        destinations to leave; their successors (and new routes) start in ``advance``.
        Returns the names of the routes detached."""
        by_name = {p.name: p for p in wanted}
        attached = self._table.plans()
        detached = []
        for name, running in attached.items():
            new = by_name.get(name)
            if new is not None and new.fingerprint == running.fingerprint:
                continue
            rt = self._table.detach(name)
            if rt is None:
                continue
            detached.append(name)
            to_state = "rebuilding" if new is not None else "removing"
            log.warning(
                "route_state",
                route=name,
                from_state="running",
                to_state=to_state,
                reason=reason,
                clusters=",".join(rt.destinations),
            )
            now = self._clock()
            for cluster, dest in rt.destinations.items():
                deadline = dest.spec.write_deadline + self._grace
                entry = _Leaving(name, cluster, dest, self._leave(dest), now, deadline)
                self._leaving.append(entry)
            if new is None:
                self._removing[name] = (rt.plan, self._wall())
        for name, p in by_name.items():
            old = attached.get(name)
            if old is not None and old.fingerprint == p.fingerprint:
                self._pending.pop(name, None)  # still running as it is
                continue
            prev = self._pending.get(name)
            if prev is not None:
                state = prev.state
            elif old is not None or name in self._removing:
                state = "rebuilding"
            else:
                state = "starting"
            self._removing.pop(name, None)
            since = prev.since if prev is not None else self._wall()
            self._pending[name] = _Pending(p, since, state)
        for name in [n for n in self._pending if n not in by_name]:
            old_plan = self._pending.pop(name).plan
            if any(e.route == name for e in self._leaving):
                self._removing[name] = (old_plan, self._wall())
        self._publish()
        self._on_change()
        return detached

    def advance(self) -> None:
        """Reap the old destinations that left, report the overdue ones, and start every
        waiting route none of whose groups still has an old destination."""
        now = self._clock()
        changed = False
        for entry in list(self._leaving):
            waited = now - entry.started
            if entry.done.is_set():
                self._leaving.remove(entry)
                changed = True
                log.info(
                    "destination_left",
                    route=entry.route,
                    cluster=entry.cluster,
                    group=entry.group,
                    seconds=round(waited, 1),
                )
            elif waited > entry.deadline and not entry.reported:
                entry.reported = True
                changed = True
                log.error(
                    "route_rebuild_stuck",
                    route=entry.route,
                    cluster=entry.cluster,
                    group=entry.group,
                    waited=round(waited, 1),
                    deadline=round(entry.deadline, 1),
                    reason="the old consumer has not left its group; its successor waits "
                    "(never two consumers of one group)",
                )
        for name in list(self._removing):
            if not any(e.route == name for e in self._leaving):
                del self._removing[name]
                changed = True
                log.info("route_state", route=name, from_state="removing", to_state="removed")
        busy = {e.group for e in self._leaving}
        for name, pending in list(self._pending.items()):
            if now < pending.retry_at or busy & set(pending.plan.groups.values()):
                continue
            try:
                rt = self._build(pending.plan)
            except RouterError as exc:
                pending.retry_at = now + self._retry
                log.error("route_build_failed", route=name, error=str(exc))
                continue
            self._table.attach(rt)
            del self._pending[name]
            changed = True
            log.info(
                "route_state",
                route=name,
                from_state=pending.state,
                to_state="running",
                reason="destinations started",
                waited=round(self._wall() - pending.since, 1),
            )
        if changed:
            self._publish()
            self._on_change()

    @property
    def idle(self) -> bool:
        """Nothing to start and nothing leaving."""
        return not self._pending and not self._leaving

    def groups(self) -> frozenset[str]:
        """Groups of the routes waiting to start and of the old destinations still leaving."""
        pending = {g for p in self._pending.values() for g in p.plan.groups.values()}
        return frozenset(pending | {e.group for e in self._leaving})

    def leaving(self) -> list[DestinationLike]:
        return [e.dest for e in self._leaving]

    def _publish(self) -> None:
        shown = []
        for name, p in self._pending.items():
            mine = tuple(e for e in self._leaving if e.route == name)
            if mine:
                groups = ", ".join(e.group for e in mine)
                reason = f"waiting for the old consumers of {groups} to leave"
            else:
                reason = "starting its destinations"
            shown.append(_Shown(p.plan, p.state, p.since, reason, mine))
        for name, (plan, since) in self._removing.items():
            mine = tuple(e for e in self._leaving if e.route == name)
            shown.append(_Shown(plan, "removing", since, "removed from the topology", mine))
        self._shown = tuple(shown)

    # --- any thread ---------------------------------------------------------------------

    def snapshots(self) -> list[RouteSnapshot]:
        """The routes being started, rebuilt or removed, with their leaving destinations."""
        now = self._clock()
        out = []
        for s in self._shown:
            cfg = s.plan.config
            waiting = tuple(
                LeaveView(e.cluster, e.group, now - e.started, e.deadline) for e in s.leaving
            )
            reason = s.reason
            overdue = [w for w in waiting if w.overdue]
            if overdue:
                reason = (
                    f"old consumer of {overdue[0].group} has not left after "
                    f"{overdue[0].waited:.0f}s (deadline {overdue[0].deadline:.0f}s); "
                    "its successor waits"
                )
            out.append(
                RouteSnapshot(
                    name=cfg.name,
                    mode=cfg.mode,
                    topics=cfg.topics,
                    primary=cfg.destinations[0],
                    state=s.state,
                    reason=reason,
                    since=s.since,
                    active=(),
                    destinations=tuple(
                        DestinationView(e.cluster, e.dest.status, active=False, leaving=True)
                        for e in s.leaving
                    ),
                    waiting_for=waiting,
                )
            )
        return out


class Reloader(Worker):
    def __init__(
        self,
        *,
        path: Path | None,
        load: Callable[[Path], Topology],
        apply: Callable[[Topology], None],
        rebuilder: Rebuilder,
        metrics: Metrics,
        interval: float = 0.25,
        each_pass: Callable[[], None] = lambda: None,
    ) -> None:
        """``load`` reads and validates the file (raises ConfigError); ``apply`` carries out
        a valid topology (on this thread); ``each_pass`` runs on this thread after every look
        at the file (the router's watch of the Kafka secrets)."""
        self._path = path
        self._each_pass = each_pass
        self._load = load
        self._apply = apply
        self._rebuilder = rebuilder
        self._metrics = metrics
        self._interval = interval
        self._hash = self._hash_file()
        self._submitted: Topology | None = None
        self._submit_lock = threading.Lock()
        self.error = ""  # why the watched file was refused ("" while it is valid)
        Worker.__init__(self, "reload")

    def submit(self, topology: Topology) -> None:
        """Apply this (valid) topology on the reload thread, soon; a later one replaces it."""
        with self._submit_lock:
            self._submitted = topology
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._wake.wait(self._interval)
            self._wake.clear()

    def run_once(self) -> None:
        """One look at the file and the submitted topology, then one step of the rebuilds."""
        new = self._check_file()
        with self._submit_lock:
            submitted, self._submitted = self._submitted, None
        for topology in (submitted, new):
            if topology is not None:
                self._apply(topology)
        self._each_pass()
        self._rebuilder.advance()

    def _hash_file(self) -> str:
        if self._path is None:
            return ""
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def _check_file(self) -> Topology | None:
        if self._path is None:
            return None
        digest = self._hash_file()
        if not digest or digest == self._hash:
            return None
        self._hash = digest
        try:
            new = self._load(self._path)
        except ConfigError as exc:
            self.error = "; ".join(exc.errors)
            self._metrics.topology_reloads.labels(outcome="rejected").inc()
            self._metrics.topology_valid.set(0)
            log.error(
                "topology_rejected",
                path=str(self._path),
                errors=exc.errors,
                reason="invalid topology; still running on the last good one",
            )
            return None
        self.error = ""
        self._metrics.topology_valid.set(1)
        self._metrics.topology_reloads.labels(outcome="applied").inc()
        return new


def plans_of(topology: Topology) -> list[RoutePlan]:
    return [RoutePlan.of(route, topology) for route in topology.routes]


def groups_in_use(plans: Mapping[str, RoutePlan], rebuilder: Rebuilder) -> frozenset[str]:
    running = {g for p in plans.values() for g in p.groups.values()}
    return frozenset(running) | rebuilder.groups()

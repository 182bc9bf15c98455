"""What ``/api/status``, the status page and ``/healthz`` show, assembled from snapshots.

Nothing here waits on a lock that a thread holds during I/O. The control loop publishes a
``RouteSnapshot`` of every route it runs after each pass; the reload thread one of every route
it is rebuilding or removing; a destination's status is a frozen snapshot too. ``document``
turns them into the status JSON, ``health_problems`` into the reasons ``/healthz`` fails.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from health.verdict import ClusterState, VerdictSource
from router.destination import DestinationStatus
from router.membership import Ownership
from router.offsets import TopicPart
from router.topology import Topology

RATE_WINDOW = 10.0  # seconds of points/s shown per destination


class Rate:
    """Points per second over the last ``window`` seconds, from a growing total sampled by the
    control loop (a total that shrinks, a rebuilt destination, starts a new window)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, total: int) -> float | None:
        """Record ``total`` at ``now`` (monotonic); the rate, None until 1 s is covered."""
        if self._samples and total < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        if now - t0 < 1.0:
            return None
        return (total - n0) / (now - t0)


@dataclass(frozen=True)
class PartitionView:
    """One partition of one destination, for the per-partition table."""

    tp: TopicPart
    committed: int | None  # None: never committed (or not read yet)
    end: int | None  # high watermark of the last reading
    lag: int | None
    lag_seconds: float | None
    assigned: bool  # owned by this replica
    paused: bool
    last_write: float | None  # wall-clock time InfluxDB last took its messages
    stalled: bool


@dataclass(frozen=True)
class DestinationView:
    """One destination as of the last pass over its route."""

    cluster: str
    status: DestinationStatus
    active: bool  # the route wants it to receive the stream
    lag: int | None = None  # messages its group has not committed (None: not known)
    lag_age: float | None = None  # seconds since that lag was read
    stalled: tuple[TopicPart, ...] = ()  # partitions with lag and a standing commit
    stalled_for: float = 0.0
    leaving: bool = False  # an old destination of a route being rebuilt or removed
    points_per_s: float | None = None  # over the last RATE_WINDOW seconds
    lag_seconds: float | None = None  # age of the oldest message not committed (None: unknown)
    partitions: tuple[PartitionView, ...] = ()


@dataclass(frozen=True)
class LeaveView:
    """An old destination a rebuild waits for: its successor starts once it left its group."""

    cluster: str
    group: str
    waited: float  # seconds since it was asked to stop
    deadline: float  # seconds it may take (write deadline + grace); after that: overdue

    @property
    def overdue(self) -> bool:
        return self.waited > self.deadline


@dataclass(frozen=True)
class RouteSnapshot:
    name: str
    mode: str
    topics: tuple[str, ...]
    primary: str
    state: str  # running | rebuilding | removing | starting
    reason: str
    since: float  # wall-clock time the route entered its state
    active: tuple[str, ...]
    destinations: tuple[DestinationView, ...]
    handoff: tuple[str, ...] = ()  # clusters whose graceful deactivation the route waits for
    lag_error: str = ""  # the lag reader's last error for this route
    waiting_for: tuple[LeaveView, ...] = ()
    active_since: float = 0.0  # wall-clock time the active set last changed
    active_reason: str = ""  # why it is what it is ("failed over to b: a down: ...")
    usable: tuple[str, ...] = ()  # the route's clusters the policy may use now


def route_unready(
    group: str, held: Ownership, destinations: Sequence[DestinationView], empty_grace: float
) -> str:
    """Why a route does not hold its partitions on this replica yet ("" when it does): its
    membership (``group``) has no assignment yet, or an empty one younger than
    ``empty_grace`` (a joining replica's first round), or a destination has not been assigned
    every partition the membership owns yet."""
    if not held.settled:
        return f"waiting for its partition assignment in group {group}"
    if not held.owned and held.empty_for < empty_grace:
        return (
            f"its assignment in group {group} is empty so far (a joining replica gets its "
            f"partitions in a second round); ready after {empty_grace:g}s if it stays empty"
        )
    for view in destinations:
        if view.leaving:
            continue
        n = len(held.owned & set(view.status.assigned))
        if n < len(held.owned):
            return f"{view.cluster} holds {n} of its {len(held.owned)} partitions so far"
    return ""


def tp_name(tp: TopicPart) -> str:
    return f"{tp[0]}[{tp[1]}]"


def _age(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def partition_json(p: PartitionView) -> dict[str, Any]:
    return {
        "partition": tp_name(p.tp),
        "topic": p.tp[0],
        "index": p.tp[1],
        "committed": p.committed,
        "end": p.end,
        "lag": p.lag,
        "lag_seconds": _age(p.lag_seconds),
        "assigned": p.assigned,
        "paused": p.paused,
        "last_write": p.last_write,
        "stalled": p.stalled,
    }


def idle_expected(r: RouteSnapshot, v: DestinationView) -> bool:
    """A standby of a failover route, not wanted and paused (or never started: a standby
    gets no command until it is needed): its lag grows on purpose."""
    return (
        r.mode == "failover"
        and v.cluster != r.primary
        and not v.active
        and v.status.state in ("paused", "starting")
    )


def destination_json(
    v: DestinationView,
    route: RouteSnapshot | None = None,
    totals: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One destination; ``totals`` holds its dead-letter / retention-loss / skipped counts."""
    st = v.status
    t = totals or {}
    return {
        "cluster": v.cluster,
        "group": st.group,
        "active": v.active,
        "state": st.state,
        "reason": st.reason,
        "since": st.since,
        "error": st.error,
        "lag": v.lag,
        "lag_age": _age(v.lag_age),
        "assigned": len(st.assigned),
        "paused": len(st.paused),
        "in_flight": st.in_flight,
        "buffered": st.buffered,
        "oldest_unsettled": round(st.oldest_unsettled, 1),
        "write_deadline": st.write_deadline,
        "thread_alive": st.thread_alive,
        "stalled": bool(v.stalled),
        "stalled_partitions": [tp_name(tp) for tp in v.stalled],
        "stalled_for": round(v.stalled_for, 1),
        "leaving": v.leaving,
        "points_per_s": None if v.points_per_s is None else round(v.points_per_s, 1),
        "lag_seconds": _age(v.lag_seconds),
        "idle_expected": route is not None and idle_expected(route, v),
        "dead_letters": int(t.get("dead_letters", 0)),
        "retention_lost": int(t.get("retention_lost", 0)),
        "skipped": int(t.get("skipped", 0)),
        "partitions": [partition_json(p) for p in v.partitions],
    }


def route_json(
    r: RouteSnapshot, totals: Mapping[tuple[str, str], Mapping[str, float]] | None = None
) -> dict[str, Any]:
    """One route; ``totals`` maps (route, cluster) to its counters (see ``counter_totals``)."""
    t = totals or {}
    return {
        "name": r.name,
        "mode": r.mode,
        "topics": list(r.topics),
        "primary": r.primary,
        "state": r.state,
        "reason": r.reason,
        "since": r.since,
        "active": list(r.active),
        "handoff": list(r.handoff),
        "lag_error": r.lag_error,
        "waiting_for": [
            {
                "cluster": w.cluster,
                "group": w.group,
                "waited": round(w.waited, 1),
                "deadline": round(w.deadline, 1),
                "overdue": w.overdue,
            }
            for w in r.waiting_for
        ],
        "active_since": r.active_since,
        "active_reason": r.active_reason,
        "usable": list(r.usable),
        "has_usable_cluster": bool(r.usable),
        "destinations": [
            destination_json(d, r, t.get((r.name, d.cluster))) for d in r.destinations
        ],
    }


def counter_totals(
    counters: Mapping[str, Any],
) -> dict[tuple[str, str], dict[str, float]]:
    """Sum each labelled prometheus counter over its other labels, per (route, cluster):
    ``{"dead_letters": metrics.dead_letters, ...}`` -> {(route, cluster): {name: total}}."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for name, counter in counters.items():
        for family in counter.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = (sample.labels.get("route", ""), sample.labels.get("cluster", ""))
                per = out.setdefault(key, {})
                per[name] = per.get(name, 0.0) + sample.value
    return out


def grand_totals(totals: Mapping[tuple[str, str], Mapping[str, float]]) -> dict[str, int]:
    """Every (route, cluster) added up: what the status page shows as the router's totals."""
    out: dict[str, int] = {}
    for per in totals.values():
        for name, value in per.items():
            out[name] = out.get(name, 0) + int(value)
    return out


def clusters_json(
    topology: Topology,
    verdicts: VerdictSource,
    drained: Callable[[str], bool],
    misconfigured: Mapping[str, str],
) -> dict[str, Any]:
    clusters = {}
    for name, cfg in topology.clusters.items():
        try:
            v = verdicts.verdict(name)
        except KeyError:  # a reload is swapping clusters right now
            continue
        is_drained = drained(name)
        clusters[name] = {
            "state": v.state.value,
            "since": v.since,
            "reason": misconfigured.get(
                name, v.reason if v.state is ClusterState.DOWN else "healthy"
            ),
            "drain": is_drained,
            "drain_source": "topology" if cfg.drain else ("consul" if is_drained else ""),
            "misconfigured": name in misconfigured,
            "healthy_nodes": len(verdicts.healthy_nodes(name)),
            "nodes": len(cfg.urls),
        }
    return clusters


def ordered(
    topology: Topology, running: Mapping[str, RouteSnapshot], moving: Iterable[RouteSnapshot]
) -> list[RouteSnapshot]:
    """Routes in topology order, then the ones being removed; a route being rebuilt shows as
    such even if the control loop's snapshot of its old self is still around."""
    by_name = {**running, **{r.name: r for r in moving}}
    names = [r.name for r in topology.routes]
    names += sorted(n for n in by_name if n not in names)
    return [by_name[n] for n in names if n in by_name]


def health_problems(
    routes: Iterable[RouteSnapshot],
    *,
    loop_alive: bool,
    tick_age: float | None,
    tick_timeout: float,
) -> list[str]:
    """Why the router is not healthy, one line each; empty when it is.

    The control loop ended or stopped ticking; or a destination that serves a route has a batch
    unsettled for longer than its write deadline, or its consumer thread ended and was not
    rebuilt. (A destination that is leaving, during a rebuild, is the rebuild's business.)
    """
    problems = []
    if not loop_alive:
        problems.append("control loop ended")
    elif tick_age is not None and tick_age > tick_timeout:
        problems.append(f"control loop stopped ticking: last tick {tick_age:.0f}s ago")
    for r in routes:
        for d in r.destinations:
            if d.leaving:
                continue
            st = d.status
            where = f"{r.name}/{d.cluster}"
            if not st.thread_alive:
                why = f": {st.error}" if st.error else ""
                problems.append(f"{where}: consumer thread ended and was not rebuilt{why}")
            elif st.oldest_unsettled > st.write_deadline:
                problems.append(
                    f"{where}: oldest unsettled batch {st.oldest_unsettled:.0f}s old "
                    f"(write deadline {st.write_deadline:.0f}s)"
                )
    return problems


def health_warnings(routes: Iterable[RouteSnapshot]) -> list[str]:
    """What an operator should look at although the process is healthy: stalls, stuck rebuilds."""
    warnings = []
    for r in routes:
        for d in r.destinations:
            if d.stalled:
                parts = ", ".join(tp_name(tp) for tp in d.stalled)
                warnings.append(
                    f"{r.name}/{d.cluster}: stalled on {parts} for {d.stalled_for:.0f}s"
                )
        for w in r.waiting_for:
            if w.overdue:
                warnings.append(
                    f"{r.name}: rebuild waits {w.waited:.0f}s for the old consumer of {w.group} "
                    "to leave"
                )
    return warnings


def one_line(problems: Sequence[str]) -> str:
    """The first problem, and how many more (a /healthz body is one line)."""
    if not problems:
        return ""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more

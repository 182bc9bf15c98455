"""What ``/api/status``, the status page and ``/healthz`` show, assembled from snapshots.

Nothing here waits on a lock that a thread holds during I/O. The control loop publishes a
``RouteSnapshot`` of every route it runs after each pass; the reload thread one of every route
it is rebuilding or removing; a destination's status is a frozen snapshot too. ``document``
turns them into the status JSON, ``health_problems`` into the reasons ``/healthz`` fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from health.verdict import ClusterState, VerdictSource
from router.destination import DestinationStatus
from router.offsets import TopicPart
from router.topology import Topology

# The states a destination reports (frouter_destination_state has one series per state).
DESTINATION_STATES = (
    "starting",
    "paused",
    "active",
    "backoff",
    "blocked",
    "stopped",
    "crashed",
    "closed",
)


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


def tp_name(tp: TopicPart) -> str:
    return f"{tp[0]}[{tp[1]}]"


def _age(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def destination_json(v: DestinationView) -> dict[str, Any]:
    st = v.status
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
    }


def route_json(r: RouteSnapshot) -> dict[str, Any]:
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
        "destinations": [destination_json(d) for d in r.destinations],
    }


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

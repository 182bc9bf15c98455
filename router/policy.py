"""The failover decision, as a pure function: (route, cluster views, active set, lag) -> actions.

No I/O and no clock: the engine gathers the inputs (health verdicts, drain flags, the primary
group's lag from Kafka) and carries out the actions (pause, seek, resume, flush and commit).

failover mode: the *target* is the first usable cluster of [primary, *standby] (usable = healthy
and not drained). When the target is a standby, it alone is active; it starts at
max(committed of every group of the route) per partition (TAKEOVER). When the target is the
primary again, the primary resumes from its own committed offsets and replays what it missed
(or, with skip_missed, jumps forward and records the gap); the standby keeps receiving live
data until the primary's lag is at most ``handback_lag``, then hands back gracefully.

mirror mode: every usable cluster is active from its own offsets; an unusable one is paused.

A cluster that is healthy but drained is deactivated *gracefully* (flush and commit before the
next cluster starts, so the handoff has no duplicates); an unhealthy one is paused at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class StartFrom(StrEnum):
    OWN = "own"  # the destination's own committed offsets (replay what it missed)
    TAKEOVER = "takeover"  # max over the route's groups (the standby picks up the stream)
    SKIP = "skip"  # like TAKEOVER for a returning primary; the skipped range is recorded


@dataclass(frozen=True)
class ClusterView:
    healthy: bool
    drained: bool = False
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.healthy and not self.drained


@dataclass(frozen=True)
class RouteView:
    name: str
    mode: Literal["failover", "mirror"]
    destinations: tuple[str, ...]  # failover: (primary, *standby); mirror: the clusters
    skip_missed: bool = False
    handback_lag: int = 1000

    @property
    def primary(self) -> str:
        return self.destinations[0]


@dataclass(frozen=True)
class Activate:
    cluster: str
    start: StartFrom
    reason: str


@dataclass(frozen=True)
class Deactivate:
    cluster: str
    graceful: bool
    reason: str


Action = Activate | Deactivate


def _why(cluster: str, view: ClusterView) -> str:
    if view.drained and view.healthy:
        return f"{cluster} drained"
    return f"{cluster} down: {view.reason}" if view.reason else f"{cluster} down"


def _stop(cluster: str, view: ClusterView, reason: str | None = None) -> Deactivate:
    # Graceful only when the cluster can still take the flush (drained but healthy).
    return Deactivate(cluster, graceful=view.healthy, reason=reason or _why(cluster, view))


def decide(
    route: RouteView,
    clusters: Mapping[str, ClusterView],
    active: frozenset[str],
    primary_lag: int | None = None,
) -> list[Action]:
    """The actions that bring ``active`` to where the route should be now.

    Deactivations come first: the engine finishes a graceful one before it activates the
    next cluster. ``primary_lag`` (messages, over all partitions) is only consulted while a
    returning primary replays alongside a standby; None means "not known yet".
    """
    down = ClusterView(healthy=False, reason="unknown cluster")
    view = {c: clusters.get(c, down) for c in route.destinations}
    if route.mode == "mirror":
        stops: list[Action] = [_stop(c, view[c]) for c in route.destinations if c in active]
        stops = [a for a in stops if not view[a.cluster].usable]
        starts: list[Action] = [
            Activate(c, StartFrom.OWN, f"{c} usable")
            for c in route.destinations
            if c not in active and view[c].usable
        ]
        return stops + starts

    target = next((c for c in route.destinations if view[c].usable), None)
    actions: list[Action] = []
    primary = route.primary
    if target == primary:
        standbys_active = [c for c in route.destinations[1:] if c in active]
        if primary not in active:
            skip = route.skip_missed and bool(standbys_active)
            start = StartFrom.SKIP if skip else StartFrom.OWN
            actions.append(Activate(primary, start, f"{primary} usable again"))
        for c in standbys_active:
            if not view[c].healthy:
                actions.insert(0, _stop(c, view[c]))
            elif (
                primary in active and primary_lag is not None and primary_lag <= route.handback_lag
            ):
                actions.append(
                    Deactivate(c, graceful=True, reason=f"{primary} caught up (lag {primary_lag})")
                )
        return actions

    for c in route.destinations:
        if c in active and c != target:
            actions.append(_stop(c, view[c]))
    if target is not None and target not in active:
        failed = next((c for c in route.destinations if not view[c].usable), primary)
        actions.append(Activate(target, StartFrom.TAKEOVER, _why(failed, view[failed])))
    return actions

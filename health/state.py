"""Health state with hysteresis, per node and per cluster. Pure: no I/O, no clock, no threads.

Node (like an HAProxy server check): an UP node goes DOWN after ``fall`` consecutive failed
checks; a DOWN node goes UP after ``rise`` consecutive successful checks. A success resets the
failure count and a failure resets the success count. A "check" is an active probe or a write
(passive signal); both count the same.

Cluster: UP while at least ``min_healthy`` of its nodes are UP.

Start state: every node is UP (optimistic, like a freshly configured HAProxy server), so a
router that starts while a cluster is fine writes at once, and a cluster that is really down
goes DOWN after ``fall`` failed checks.

Membership change (:meth:`ClusterHealth.set_nodes`, on a topology reload): nodes that stay
keep their state and counters. A node that is new to a cluster that has already observed a
check starts DOWN and needs ``rise`` successful checks before it takes writes; while the cluster
has no history yet (nothing observed since it was created), new nodes start UP like the first
ones. So replacing every URL of a live cluster makes it DOWN until the new nodes have passed
``rise`` checks.

The caller serialises access (one lock around a :class:`ClusterHealth`); times are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from health.verdict import ClusterState, Verdict

Transition = tuple[Verdict, Verdict]
"""(old, new) verdicts of one cluster transition."""


def redact_url(url: str) -> str:
    """``url`` without userinfo, query and fragment (where InfluxDB credentials can hide)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")


class NodeHealth:
    """The UP/DOWN state of one node, with ``fall``/``rise`` hysteresis."""

    def __init__(self, fall: int, rise: int, initially_up: bool = True) -> None:
        _check_positive(fall=fall, rise=rise)
        self.fall = fall
        self.rise = rise
        self._up = initially_up
        self._failures = 0  # consecutive, counted while UP
        self._successes = 0  # consecutive, counted while DOWN
        self.reason = "not checked yet" if initially_up else "new node, not checked yet"

    @property
    def up(self) -> bool:
        return self._up

    def observe(self, ok: bool, reason: str) -> bool:
        """Count one check; return True when it flipped the node's state."""
        if ok:
            self._failures = 0
            if self._up:
                return False
            self._successes += 1
            if self._successes < self.rise:
                return False
            self._up, self._successes = True, 0
            self.reason = f"{self.rise}/{self.rise} checks passed"
            return True
        self._successes = 0
        if not self._up:
            return False
        self._failures += 1
        if self._failures < self.fall:
            return False
        self._up, self._failures = False, 0
        self.reason = f"{self.fall}/{self.fall} checks failed: {reason}"
        return True


class ClusterHealth:
    """Per-node health of one cluster and the cluster verdict derived from it."""

    def __init__(
        self,
        name: str,
        nodes: Sequence[str],
        fall: int,
        rise: int,
        min_healthy: int,
        *,
        now: float = 0.0,
    ) -> None:
        _check_positive(fall=fall, rise=rise, min_healthy=min_healthy)
        self.name = name
        self.fall = fall
        self.rise = rise
        self.min_healthy = min_healthy
        self._nodes: dict[str, NodeHealth] = {}
        self._has_history = False
        self._add_nodes(nodes)
        state = self._computed_state()
        reason = "not checked yet" if state is ClusterState.UP else self._counts()
        self._verdict = Verdict(cluster=name, state=state, since=now, reason=reason)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    def node(self, node: str) -> NodeHealth:
        """The health of one node (``KeyError`` if it is not a member). Read it, don't feed it."""
        return self._nodes[node]

    def verdict(self) -> Verdict:
        return self._verdict

    def healthy_nodes(self) -> list[str]:
        """The nodes that are UP, in membership order (also while the cluster is DOWN)."""
        return [url for url, health in self._nodes.items() if health.up]

    def observe(self, node: str, ok: bool, reason: str, now: float) -> Transition | None:
        """Count one check of ``node``; return (old, new) if the cluster state changed."""
        self._has_history = True
        health = self._nodes[node]
        if not health.observe(ok, reason):
            return None
        return self._settle(now, f"{redact_url(node)}: {health.reason}")

    def set_nodes(
        self, nodes: Sequence[str], now: float, *, min_healthy: int | None = None
    ) -> Transition | None:
        """Change membership (and ``min_healthy``), keeping the state of nodes that stay.

        New nodes follow the rule of the module docstring. Returns (old, new) if the cluster
        state changed; one reconfiguration makes at most one transition.
        """
        self._check_unique(nodes)
        if min_healthy is not None:
            _check_positive(min_healthy=min_healthy)
            self.min_healthy = min_healthy
        kept = {url: self._nodes[url] for url in nodes if url in self._nodes}
        self._nodes = kept
        self._add_nodes([url for url in nodes if url not in kept])
        self._nodes = {url: self._nodes[url] for url in nodes}  # membership order
        return self._settle(now, "topology changed")

    def _check_unique(self, nodes: Sequence[str]) -> None:
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"cluster {self.name!r}: duplicate node URLs")

    def _add_nodes(self, nodes: Sequence[str]) -> None:
        self._check_unique(nodes)
        for url in nodes:
            self._nodes[url] = NodeHealth(self.fall, self.rise, initially_up=not self._has_history)

    def _computed_state(self) -> ClusterState:
        up = sum(health.up for health in self._nodes.values())
        return ClusterState.UP if up >= self.min_healthy else ClusterState.DOWN

    def _counts(self) -> str:
        up = sum(health.up for health in self._nodes.values())
        return f"{up}/{len(self._nodes)} nodes up (min_healthy {self.min_healthy})"

    def _settle(self, now: float, why: str) -> Transition | None:
        state = self._computed_state()
        old = self._verdict
        if state is old.state:
            return None
        self._verdict = Verdict(self.name, state, now, f"{self._counts()}; {why}")
        return old, self._verdict

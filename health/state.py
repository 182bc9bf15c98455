"""Health state with hysteresis, per node and per cluster. Pure: no I/O, no clock, no threads.

Node (like an HAProxy server check, plus a time window): an UP node goes DOWN

- after ``fall`` consecutive failed checks (a refused connection, a 5xx: fast failures are
  counted), or
- once it has given no good answer for ``down_after`` seconds while at least one check failed
  in that time (a hung node: its probes and writes time out, so they are few and slow; the
  window, not their number, decides). The window starts at the node's last good answer (or
  when it came UP, or when checking began) and ends at ``last good answer + down_after``:
  :meth:`NodeHealth.deadline` says when, and the caller calls :meth:`NodeHealth.expire` then,
  so a node with a probe still hanging goes DOWN on time. Without a failed check in the window
  nothing happens (a checker that stopped checking does not make a node DOWN). ``down_after``
  None turns the window off (``fall`` alone decides).

A DOWN node goes UP after ``rise`` consecutive successful checks. A success resets the failure
count and restarts the window; a failure resets the success count. A "check" is an active
probe or a write (passive signal); both count the same: a write that timed out is a failed
check, like a probe that timed out.

Cluster: UP while at least ``min_healthy`` of its nodes are UP.

Start state: every node is UP (optimistic, like a freshly configured HAProxy server), so a
router that starts while a cluster is fine writes at once, and a cluster that is really down
goes DOWN after ``fall`` failed checks or ``down_after`` seconds, whichever comes first.

Membership change (:meth:`ClusterHealth.set_nodes`, on a topology reload): nodes that stay
keep their state and counters. A node that is new to a cluster that has already observed a
check starts DOWN and needs ``rise`` successful checks before it takes writes; while the cluster
has no history yet (nothing observed since it was created), new nodes start UP like the first
ones. So replacing every URL of a live cluster makes it DOWN until the new nodes have passed
``rise`` checks.

Times: ``now`` is the wall-clock time a verdict carries (``since``); ``mono`` is the time the
windows are measured in (the caller's monotonic clock; ``now`` when not given). The caller
serialises access (one lock around a :class:`ClusterHealth`); times are passed in.
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


def _check_window(down_after: float | None) -> None:
    if down_after is not None and not down_after > 0:
        raise ValueError(f"down_after must be > 0 or None, got {down_after}")


class NodeHealth:
    """The UP/DOWN state of one node: ``fall``/``rise`` hysteresis and the ``down_after``
    window (see the module docstring)."""

    def __init__(
        self,
        fall: int,
        rise: int,
        initially_up: bool = True,
        *,
        down_after: float | None = None,
        mono: float = 0.0,
    ) -> None:
        _check_positive(fall=fall, rise=rise)
        _check_window(down_after)
        self.fall = fall
        self.rise = rise
        self.down_after = down_after
        self._up = initially_up
        self._failures = 0  # consecutive, counted while UP
        self._successes = 0  # consecutive, counted while DOWN
        self._last_ok = mono  # last good answer (or UP, or start of checking): window start
        self._failed = False  # a check failed since _last_ok (the window is running)
        self._last_failure = ""
        self.reason = "not checked yet" if initially_up else "new node, not checked yet"

    @property
    def up(self) -> bool:
        return self._up

    def observe(self, ok: bool, reason: str, mono: float | None = None) -> bool:
        """Count one check; return True when it flipped the node's state. Without ``mono``
        the window is neither restarted nor judged (``fall``/``rise`` alone)."""
        return self._passed(mono) if ok else self._failed_check(reason, mono)

    def _passed(self, mono: float | None) -> bool:
        self._failures = 0
        if mono is not None:
            self._last_ok, self._failed = mono, False
        if self._up:
            return False
        self._successes += 1
        if self._successes < self.rise:
            return False
        self._up, self._successes = True, 0
        self.reason = f"{self.rise}/{self.rise} checks passed"
        return True

    def _failed_check(self, reason: str, mono: float | None) -> bool:
        self._successes = 0
        if not self._up:
            return False
        self._failures += 1
        self._failed, self._last_failure = True, reason
        if self._failures >= self.fall:
            self._down(f"{self.fall}/{self.fall} checks failed: {reason}")
            return True
        if mono is not None and self._window_over(mono):
            self._down(self._window_reason())
            return True
        return False

    def deadline(self) -> float | None:
        """When the window of an UP node with a failed check ends (None: no window runs)."""
        if not self._up or not self._failed or self.down_after is None:
            return None
        return self._last_ok + self.down_after

    def expire(self, mono: float) -> bool:
        """Judge the window at ``mono`` (no check needed); True when the node went DOWN."""
        if not self._window_over(mono):
            return False
        self._down(self._window_reason())
        return True

    def _window_over(self, mono: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and mono >= deadline

    def _window_reason(self) -> str:
        failed = f"{self._failures} check{'s' if self._failures != 1 else ''} failed"
        return f"no good answer for {self.down_after:g}s ({failed}): {self._last_failure}"

    def _down(self, reason: str) -> None:
        self._up, self._failures, self._failed = False, 0, False
        self.reason = reason


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
        down_after: float | None = None,
        mono: float | None = None,
    ) -> None:
        _check_positive(fall=fall, rise=rise, min_healthy=min_healthy)
        _check_window(down_after)
        self.name = name
        self.fall = fall
        self.rise = rise
        self.min_healthy = min_healthy
        self.down_after = down_after
        self._nodes: dict[str, NodeHealth] = {}
        self._has_history = False
        self._add_nodes(nodes, now if mono is None else mono)
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

    def observe(
        self, node: str, ok: bool, reason: str, now: float, *, mono: float | None = None
    ) -> Transition | None:
        """Count one check of ``node``; return (old, new) if the cluster state changed."""
        self._has_history = True
        health = self._nodes[node]
        if not health.observe(ok, reason, now if mono is None else mono):
            return None
        return self._settle(now, f"{redact_url(node)}: {health.reason}")

    def deadline(self) -> float | None:
        """The earliest end of a node's window (``mono`` time), None if no window runs."""
        ends = [d for d in (h.deadline() for h in self._nodes.values()) if d is not None]
        return min(ends, default=None)

    def expire(
        self, now: float, *, mono: float | None = None
    ) -> tuple[list[str], Transition | None]:
        """Nodes whose window ended go DOWN; return them and (old, new) if the cluster state
        changed (at most one transition)."""
        at = now if mono is None else mono
        gone = [url for url, health in self._nodes.items() if health.expire(at)]
        if not gone:
            return [], None
        why = f"{redact_url(gone[-1])}: {self._nodes[gone[-1]].reason}"
        return gone, self._settle(now, why)

    def set_nodes(
        self,
        nodes: Sequence[str],
        now: float,
        *,
        min_healthy: int | None = None,
        mono: float | None = None,
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
        self._add_nodes([url for url in nodes if url not in kept], now if mono is None else mono)
        self._nodes = {url: self._nodes[url] for url in nodes}  # membership order
        return self._settle(now, "topology changed")

    def _check_unique(self, nodes: Sequence[str]) -> None:
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"cluster {self.name!r}: duplicate node URLs")

    def _add_nodes(self, nodes: Sequence[str], mono: float) -> None:
        self._check_unique(nodes)
        for url in nodes:
            self._nodes[url] = NodeHealth(
                self.fall,
                self.rise,
                initially_up=not self._has_history,
                down_after=self.down_after,
                mono=mono,
            )

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

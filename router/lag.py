"""Lag and watermarks, read off the control thread, and what they say about stalls.

Threads: ``LagReader`` owns one thread, "lag", and only that thread calls Kafka here. For every
watched route it reads the partitions of the route's topics, their watermarks and each
destination group's committed offsets, every read with a deadline of its own (``read_timeout``).
It publishes one immutable ``RouteLag`` per route (a dict swapped under a lock that is never held
during a read). The control loop and the status page take the latest one and look at its age;
they never wait for Kafka. A failed read keeps the last good reading of each group (which then
ages) and records the error. A read that hangs past its deadline only delays this thread:
readings grow old, and an old reading counts as unknown (see ``RouteLag.reading``).

Every ``interval`` seconds every group of every watched route is read. Groups named by
``hurry`` (the primary of a route whose standby waits for the primary to catch up) are also
read every ``fast_interval`` seconds, with the partitions of the last full read.

Lag in seconds: on a full read, for each partition where a group has lag, the reader asks
``peek`` for the timestamp of the message at the group's committed offset (the oldest message
the group has not written; a group that never committed: the earliest retained one). The
answer for one (partition, offset) never changes, so it is kept while the committed offset
stands (a stalled or paused group costs one fetch per partition, not one per read); a group
that moves costs one small fetch per partition with lag per ``interval``. A hurried read
only reuses what is known.

``StallWatch`` is pure: fed one destination's readings, it says which of its assigned
partitions have lag while their committed offset has stood still for longer than a threshold.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from router.errors import SourceError
from router.kafka import lag_of
from router.offsets import NO_OFFSET, Marks, TopicPart
from router.worker import Worker

log = structlog.get_logger("router")

PEEK_TIMEOUT = 1.0  # seconds one read of message timestamps may take (per group and pass)


Peek = Callable[[Mapping[TopicPart, int], float], Mapping[TopicPart, float]]
"""(offset per partition, deadline in seconds) -> timestamp (seconds since the epoch) of the
message at that offset, per partition it could read (``router.kafka.KafkaAdmin.timestamps``)."""


class OffsetReader(Protocol):
    """What the lag reader needs of Kafka (``router.kafka.KafkaAdmin``)."""

    def partitions(
        self, topics: Iterable[str], *, timeout: float | None = None
    ) -> list[TopicPart]: ...

    def committed(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, int]: ...

    def watermarks(
        self, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, Marks]: ...


@dataclass(frozen=True)
class Watch:
    """One route to read: its topics and the group of each of its clusters."""

    route: str
    topics: tuple[str, ...]
    groups: tuple[tuple[str, str], ...]  # (cluster, group), in route order

    def group(self, cluster: str) -> str:
        return dict(self.groups)[cluster]


@dataclass(frozen=True)
class GroupLag:
    """One read of one destination group."""

    committed: Mapping[TopicPart, int]  # NO_OFFSET where the group never committed
    lag: Mapping[TopicPart, int]  # messages not committed yet, per partition
    read_at: float  # monotonic time the read began (the data is at least this old)
    # timestamp (seconds since the epoch) of the oldest message not committed, per partition
    # with lag whose message could be read
    oldest: Mapping[TopicPart, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.lag.values())

    def ages(self, now: float) -> dict[TopicPart, float]:
        """Seconds the oldest uncommitted message of each partition has waited (``now``: wall
        clock); 0 for a partition without lag; absent where its timestamp is not known."""
        out = {tp: 0.0 for tp, n in self.lag.items() if n <= 0}
        for tp, ts in self.oldest.items():
            if self.lag.get(tp, 0) > 0:
                out[tp] = max(0.0, now - ts)
        return out

    def seconds(self, now: float) -> float | None:
        """Age of the oldest message the group has not committed, over every partition: 0
        without lag, None when lag exists but no timestamp is known for it."""
        if self.total <= 0:
            return 0.0
        ages = self.ages(now)
        known = [ages[tp] for tp, n in self.lag.items() if n > 0 and tp in ages]
        return max(known) if known else None


@dataclass(frozen=True)
class RouteLag:
    """The latest readings of one route; each group keeps its last good one."""

    partitions: tuple[TopicPart, ...] = ()
    groups: Mapping[str, GroupLag] = field(default_factory=dict)  # cluster -> reading
    error: str = ""  # the last read's error, "" once a read succeeded again
    error_at: float = 0.0
    marks: Mapping[TopicPart, Marks] = field(default_factory=dict)  # of the last good read

    def reading(self, cluster: str, now: float, max_age: float) -> GroupLag | None:
        """The cluster's reading if it is at most ``max_age`` seconds old, else None."""
        got = self.groups.get(cluster)
        if got is None or now - got.read_at > max_age:
            return None
        return got


class LagReader(Worker):
    def __init__(
        self,
        admin: OffsetReader,
        *,
        interval: float = 2.0,
        fast_interval: float = 0.25,
        read_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        peek: Peek | None = None,
    ) -> None:
        """``peek`` reads message timestamps (lag in seconds); None: lag in messages only."""
        self._admin = admin
        self._peek = peek
        # (route, cluster) -> partition -> (offset, its message's timestamp); lag thread only
        self._stamps: dict[tuple[str, str], dict[TopicPart, tuple[int, float]]] = {}
        self.interval = interval
        self._fast = fast_interval
        self._timeout = read_timeout
        self._clock = clock
        self._lock = threading.Lock()  # guards the three dicts below; never held during a read
        self._watches: dict[str, Watch] = {}
        self._hot: dict[str, tuple[str, ...]] = {}
        self._latest: dict[str, RouteLag] = {}
        self._failing: dict[str, str] = {}  # route -> error; the reader thread's own
        self._last_full = float("-inf")
        self.last_pass = 0.0  # monotonic time the last full pass ended (0: none yet)
        Worker.__init__(self, "lag", stop_timeout=5.0)

    # --- what to read (any thread) ------------------------------------------------------

    def watch(self, watches: Iterable[Watch]) -> None:
        """Read these routes from now on; readings of a route that is gone or changed drop."""
        new = {w.route: w for w in watches}
        with self._lock:
            same = {r for r, w in self._watches.items() if new.get(r) == w}
            self._latest = {r: v for r, v in self._latest.items() if r in same}
            self._hot = {r: c for r, c in self._hot.items() if r in same}
            self._watches = new
        self._wake.set()

    def hurry(self, route: str, clusters: Iterable[str]) -> None:
        """Read these clusters' groups of ``route`` every ``fast_interval`` (none: stop)."""
        wanted = tuple(clusters)
        with self._lock:
            if wanted:
                self._hot[route] = wanted
            else:
                self._hot.pop(route, None)
        if wanted:
            self._wake.set()

    def latest(self, route: str) -> RouteLag | None:
        with self._lock:
            return self._latest.get(route)

    # --- the reader thread (stop() leaves a read stuck in Kafka behind: a daemon thread) ----

    def _run(self) -> None:
        while not self._stop.is_set():
            self.read_due()
            self._wake.wait(self._fast)
            self._wake.clear()

    def read_due(self) -> None:
        """One pass: every group if a full read is due, else the hurried ones."""
        now = self._clock()
        with self._lock:
            watches = dict(self._watches)
            hot = dict(self._hot)
        if now - self._last_full >= self.interval:
            self._last_full = now
            for w in watches.values():
                if self._stop.is_set():
                    return
                self._read(w, [c for c, _g in w.groups], reuse_partitions=False)
            self.last_pass = self._clock()
            return
        for route, clusters in hot.items():
            hw = watches.get(route)
            if hw is not None and not self._stop.is_set():
                known = dict(hw.groups)
                self._read(hw, [c for c in clusters if c in known], reuse_partitions=True)

    def _read(self, w: Watch, clusters: list[str], *, reuse_partitions: bool) -> None:
        started = self._clock()
        prev = self.latest(w.route) or RouteLag()
        try:
            parts = prev.partitions
            if not (reuse_partitions and parts):
                parts = tuple(self._admin.partitions(w.topics, timeout=self._timeout))
            marks = self._admin.watermarks(parts, timeout=self._timeout)
        except SourceError as exc:
            self._publish(w, RouteLag(prev.partitions, prev.groups, str(exc), started, prev.marks))
            return
        groups = dict(prev.groups)
        errors = []
        for cluster in clusters:
            try:
                committed = self._admin.committed(w.group(cluster), parts, timeout=self._timeout)
            except SourceError as exc:
                errors.append(str(exc))
                continue
            lag = lag_of(committed, marks)
            oldest = self._oldest(
                w.route, cluster, committed, lag, marks, fetch=not reuse_partitions
            )
            groups[cluster] = GroupLag(committed, lag, started, oldest)
        error = "; ".join(errors)
        self._publish(w, RouteLag(parts, groups, error, started if error else 0.0, marks))

    def _oldest(
        self,
        route: str,
        cluster: str,
        committed: Mapping[TopicPart, int],
        lag: Mapping[TopicPart, int],
        marks: Mapping[TopicPart, Marks],
        *,
        fetch: bool,
    ) -> dict[TopicPart, float]:
        """The timestamp of the oldest uncommitted message per partition with lag (see the
        module docstring); known ones are reused, the others read if ``fetch``."""
        if self._peek is None:
            return {}
        known = self._stamps.get((route, cluster), {})
        wanted = {
            tp: max(committed.get(tp, NO_OFFSET), marks[tp].low)
            for tp, n in lag.items()
            if n > 0 and tp in marks
        }
        stamps = {tp: known[tp] for tp, o in wanted.items() if tp in known and known[tp][0] == o}
        missing = {tp: o for tp, o in wanted.items() if tp not in stamps}
        if missing and fetch and not self._stop.is_set():
            try:
                got = self._peek(missing, min(self._timeout, PEEK_TIMEOUT))
            except SourceError as exc:
                log.debug("lag_timestamps_failed", route=route, cluster=cluster, error=str(exc))
            else:
                # a partition whose message did not come (only transaction markers left, no
                # timestamp) is remembered as unknown too: not asked again at this offset
                stamps.update({tp: (o, got.get(tp, math.nan)) for tp, o in missing.items()})
        if fetch:
            self._stamps[(route, cluster)] = stamps
        return {tp: ts for tp, (_o, ts) in stamps.items() if not math.isnan(ts)}

    def _publish(self, w: Watch, reading: RouteLag) -> None:
        with self._lock:
            if self._watches.get(w.route) != w:
                return  # unwatched or changed while we read: this reading is of the past
            self._latest = {**self._latest, w.route: reading}
        was = self._failing.get(w.route, "")
        if reading.error and not was:
            log.warning("lag_read_failed", route=w.route, error=reading.error)
        elif was and not reading.error:
            log.info("lag_read_recovered", route=w.route)
        if reading.error:
            self._failing[w.route] = reading.error
        else:
            self._failing.pop(w.route, None)


class StallWatch:
    """Which assigned partitions of one destination have lag while its committed offset stands
    still for longer than ``after`` seconds, measured in reading time (so readings that stop
    coming, for example while Kafka is unreachable, never make a stall).

    A partition's clock starts at the first reading that shows it with lag at a committed offset,
    while the destination serves (is active, or should be) and has it assigned; it restarts when
    the committed offset moves, and stops when the lag is gone, the partition is no longer
    assigned or the destination stops serving.
    """

    def __init__(self, after: float) -> None:
        self.after = after
        self._since: dict[TopicPart, tuple[int, float]] = {}  # partition -> (committed, since)
        self._seen = float("nan")  # read_at of the last reading taken into account
        self.stalled: tuple[TopicPart, ...] = ()
        self.stalled_for = 0.0  # seconds the longest-stalled partition has stood still

    def update(
        self, reading: GroupLag | None, assigned: Iterable[TopicPart], serving: bool
    ) -> tuple[TopicPart, ...]:
        """Take a reading into account; returns the stalled partitions, sorted."""
        if not serving:
            self._since = {}
            self._seen = float("nan")
            self.stalled, self.stalled_for = (), 0.0
            return self.stalled
        if reading is None or reading.read_at == self._seen:
            return self.stalled
        self._seen = reading.read_at
        since: dict[TopicPart, tuple[int, float]] = {}
        for tp in assigned:
            pos = reading.committed.get(tp)
            if pos is None or reading.lag.get(tp, 0) <= 0:
                continue
            prev = self._since.get(tp)
            since[tp] = prev if prev is not None and prev[0] == pos else (pos, reading.read_at)
        self._since = since
        ages = {tp: reading.read_at - t0 for tp, (_pos, t0) in since.items()}
        self.stalled = tuple(sorted(tp for tp, age in ages.items() if age > self.after))
        self.stalled_for = max((ages[tp] for tp in self.stalled), default=0.0)
        return self.stalled

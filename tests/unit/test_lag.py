"""The lag reader and the stall watch: fake Kafka reads that hang or fail, no servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import pytest
from structlog.testing import capture_logs

from router.errors import SourceError
from router.lag import GroupLag, LagReader, RouteLag, StallWatch, Watch
from router.offsets import NO_OFFSET, Marks, TopicPart

T0: TopicPart = ("t", 0)
T1: TopicPart = ("t", 1)
WATCH = Watch("r", ("t",), (("a", "g.r.a"), ("b", "g.r.b")))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeAdmin:
    """Offsets in memory; reads can be made to fail (``fail``) or hang (``hang``)."""

    def __init__(self) -> None:
        self.marks = {T0: Marks(0, 100), T1: Marks(10, 50)}
        self.commits: dict[str, dict[TopicPart, int]] = {
            "g.r.a": {T0: 90, T1: NO_OFFSET},
            "g.r.b": {T0: 100, T1: 50},
        }
        self.fail: dict[str, str] = {}  # "partitions" | "watermarks" | group -> error text
        self.hang = threading.Event()  # while clear... see ``hanging``
        self.hanging = False
        self.entered = threading.Event()
        self.calls: list[tuple[str, float | None]] = []

    def _call(self, what: str, timeout: float | None) -> None:
        self.calls.append((what, timeout))
        if self.hanging:
            self.entered.set()
            self.hang.wait(10)
        if what in self.fail:
            raise SourceError(self.fail[what])

    def partitions(self, topics: Iterable[str], *, timeout: float | None = None) -> list[TopicPart]:
        self._call("partitions", timeout)
        return sorted(self.marks)

    def watermarks(
        self, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, Marks]:
        self._call("watermarks", timeout)
        return {tp: self.marks[tp] for tp in tps}

    def committed(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, int]:
        self._call(group, timeout)
        return {tp: self.commits[group].get(tp, NO_OFFSET) for tp in tps}


@pytest.fixture
def admin() -> Iterator[FakeAdmin]:
    a = FakeAdmin()
    yield a
    a.hang.set()


def reader(admin: FakeAdmin, clock: Clock, **kw: float) -> LagReader:
    r = LagReader(
        admin, interval=2.0, fast_interval=0.25, read_timeout=3.0, clock=clock, peek=None, **kw
    )
    r.watch([WATCH])
    return r


def test_reads_the_lag_of_every_group_of_a_watched_route(admin: FakeAdmin) -> None:
    """Each group's lag is high minus committed; a partition never committed counts from low."""
    clock = Clock()
    r = reader(admin, clock)
    r.read_due()
    snap = r.latest("r")
    assert snap is not None
    assert snap.groups["a"].lag == {T0: 10, T1: 40}
    assert snap.groups["b"].total == 0
    assert snap.groups["a"].read_at == 100.0
    assert snap.error == ""


def test_every_read_has_the_readers_own_deadline(admin: FakeAdmin) -> None:
    """Every Kafka call is made with the reader's read_timeout, never the admin's default."""
    r = reader(admin, Clock())
    r.read_due()
    assert admin.calls and {timeout for _what, timeout in admin.calls} == {3.0}


def test_a_failed_group_read_keeps_its_last_good_reading(admin: FakeAdmin) -> None:
    """A group whose committed offsets cannot be read keeps its older reading; the error shows."""
    clock = Clock()
    r = reader(admin, clock)
    r.read_due()
    admin.fail["g.r.a"] = "coordinator not available"
    admin.commits["g.r.b"][T0] = 95
    clock.now += 2.0
    r.read_due()
    snap = r.latest("r")
    assert snap is not None
    assert snap.groups["a"].read_at == 100.0
    assert snap.groups["b"].read_at == 102.0
    assert snap.groups["b"].lag[T0] == 5
    assert "coordinator not available" in snap.error


def test_a_failed_watermark_read_keeps_every_reading(admin: FakeAdmin) -> None:
    """When the watermarks cannot be read, every group keeps its last reading and the route
    records the error."""
    clock = Clock()
    r = reader(admin, clock)
    r.read_due()
    admin.fail["watermarks"] = "broker down"
    clock.now += 2.0
    r.read_due()
    snap = r.latest("r")
    assert snap is not None
    assert snap.error == "broker down"
    assert snap.groups["a"].read_at == 100.0


def test_read_failures_are_logged_once_per_streak(admin: FakeAdmin) -> None:
    """lag_read_failed is logged when reads start failing, lag_read_recovered when they work
    again; not at every failed read."""
    clock = Clock()
    r = reader(admin, clock)
    admin.fail["partitions"] = "broker down"
    with capture_logs() as logs:
        for _ in range(3):
            r.read_due()
            clock.now += 2.0
        del admin.fail["partitions"]
        r.read_due()
    assert [e["event"] for e in logs] == ["lag_read_failed", "lag_read_recovered"]


def test_an_old_reading_counts_as_unknown() -> None:
    """RouteLag.reading returns nothing for a reading older than max_age."""
    snap = RouteLag((T0,), {"a": GroupLag({T0: 1}, {T0: 5}, read_at=10.0)})
    assert snap.reading("a", now=15.0, max_age=6.0) is not None
    assert snap.reading("a", now=16.5, max_age=6.0) is None
    assert snap.reading("b", now=10.0, max_age=6.0) is None


def test_hurried_groups_are_read_between_full_reads(admin: FakeAdmin) -> None:
    """A hurried group is read at every pass, with the partitions of the last full read."""
    clock = Clock()
    r = reader(admin, clock)
    r.read_due()
    r.hurry("r", ["a"])
    admin.calls.clear()
    clock.now += 0.25
    r.read_due()
    assert [what for what, _t in admin.calls] == ["watermarks", "g.r.a"]
    snap = r.latest("r")
    assert snap is not None
    assert snap.groups["a"].read_at == 100.25
    assert snap.groups["b"].read_at == 100.0


def test_nothing_is_read_between_full_reads_without_hurry(admin: FakeAdmin) -> None:
    """Between two full reads, a pass with nothing hurried reads nothing."""
    clock = Clock()
    r = reader(admin, clock)
    r.read_due()
    admin.calls.clear()
    clock.now += 1.0
    r.read_due()
    assert admin.calls == []


def test_an_unwatched_route_loses_its_reading(admin: FakeAdmin) -> None:
    """A route no longer watched has no reading, and a read that ends after it was unwatched
    does not bring one back."""
    clock = Clock()
    r = reader(admin, clock)
    r.read_due()
    admin.hanging = True
    clock.now = 200.0
    t = threading.Thread(target=r.read_due)
    t.start()
    assert admin.entered.wait(5)
    r.watch([])
    assert r.latest("r") is None
    admin.hang.set()
    t.join(5)
    assert r.latest("r") is None


def test_a_changed_route_drops_its_old_reading(admin: FakeAdmin) -> None:
    """A route watched with other groups (rebuilt) starts without readings."""
    r = reader(admin, Clock())
    r.read_due()
    r.watch([Watch("r", ("t",), (("a", "g.r.a"), ("c", "g.r.c")))])
    assert r.latest("r") is None


def test_a_hanging_read_never_blocks_the_latest_reading(admin: FakeAdmin) -> None:
    """While a Kafka read hangs on the reader's thread, latest() answers at once with the last
    reading, and stop() returns."""
    r = LagReader(admin, interval=0.05, fast_interval=0.01, read_timeout=3.0)
    r.watch([WATCH])
    r.read_due()
    admin.hanging = True
    r.start()
    assert admin.entered.wait(5)
    began = time.monotonic()
    snap = r.latest("r")
    assert time.monotonic() - began < 0.05
    assert snap is not None and snap.groups["a"].total == 50
    began = time.monotonic()
    r.stop(timeout=0.2)
    assert time.monotonic() - began < 1.0


# --- stall watch ----------------------------------------------------------------------------


def reading(at: float, committed: int, lag: int, tp: TopicPart = T0) -> GroupLag:
    return GroupLag({tp: committed}, {tp: lag}, read_at=at)


def test_a_standing_commit_with_lag_is_a_stall_after_the_threshold() -> None:
    """Lag on an assigned partition whose commit has not moved for longer than the threshold
    is a stall; not before."""
    w = StallWatch(after=10.0)
    assert w.update(reading(0.0, 5, 3), [T0], serving=True) == ()
    assert w.update(reading(10.0, 5, 9), [T0], serving=True) == ()
    assert w.update(reading(10.5, 5, 9), [T0], serving=True) == (T0,)
    assert w.stalled_for == 10.5


def test_a_moving_commit_restarts_the_clock() -> None:
    """A commit that moves (even with lag) restarts the partition's clock."""
    w = StallWatch(after=10.0)
    w.update(reading(0.0, 5, 3), [T0], serving=True)
    w.update(reading(8.0, 6, 3), [T0], serving=True)
    assert w.update(reading(15.0, 6, 3), [T0], serving=True) == ()
    assert w.update(reading(18.5, 6, 3), [T0], serving=True) == (T0,)


def test_no_lag_is_no_stall() -> None:
    """A partition without lag never stalls, however long its commit stands."""
    w = StallWatch(after=10.0)
    w.update(reading(0.0, 5, 0), [T0], serving=True)
    assert w.update(reading(100.0, 5, 0), [T0], serving=True) == ()


def test_the_clock_starts_when_lag_appears() -> None:
    """A partition idle for long (no lag) is not stalled the moment a message arrives."""
    w = StallWatch(after=10.0)
    w.update(reading(0.0, 5, 0), [T0], serving=True)
    assert w.update(reading(100.0, 5, 1), [T0], serving=True) == ()
    assert w.update(reading(111.0, 5, 1), [T0], serving=True) == (T0,)


def test_unassigned_partitions_are_not_watched() -> None:
    """Lag on a partition assigned to another replica is not this destination's stall."""
    w = StallWatch(after=10.0)
    w.update(reading(0.0, 5, 3), [T1], serving=True)
    assert w.update(reading(20.0, 5, 3), [T1], serving=True) == ()


def test_a_destination_that_does_not_serve_never_stalls() -> None:
    """A paused destination (not active) has lag by design; the clock restarts when it serves."""
    w = StallWatch(after=10.0)
    w.update(reading(0.0, 5, 3), [T0], serving=False)
    w.update(reading(20.0, 5, 3), [T0], serving=False)
    assert w.update(reading(25.0, 5, 3), [T0], serving=True) == ()
    assert w.update(reading(36.0, 5, 3), [T0], serving=True) == (T0,)
    assert w.update(reading(37.0, 5, 3), [T0], serving=False) == ()


def test_no_new_reading_never_makes_a_stall() -> None:
    """While readings stop coming (Kafka unreachable), the watch does not conclude anything."""
    w = StallWatch(after=10.0)
    old = reading(0.0, 5, 3)
    for _ in range(5):
        assert w.update(old, [T0], serving=True) == ()
    assert w.update(None, [T0], serving=True) == ()

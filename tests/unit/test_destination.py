"""The destination state machine against fault-injecting fakes of its edges (no servers)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import pytest
from prometheus_client import CollectorRegistry

from router import destination
from router.destination import Destination, DestinationSpec, State
from router.metrics import Metrics
from router.offsets import TopicPart
from router.policy import StartFrom
from router.sink import Rejected
from tests.support import wait_until
from tests.unit.fakes import (
    FakeAdmin,
    FakeDeadLetters,
    FakeSink,
    FakeSource,
    Kafka,
    misconfigured,
)

P0: TopicPart = ("m", 0)
P1: TopicPart = ("m", 1)
SPEC = DestinationSpec(
    route="r",
    cluster="b",
    group="g.r.b",
    topics=("m",),
    peer_groups=("g.r.a", "g.r.b"),
    max_points=10,
    max_bytes=10_000,
    linger=0.02,
    max_in_flight=2,
    write_deadline=5.0,
)


@dataclass
class Rig:
    kafka: Kafka
    source: FakeSource
    sink: FakeSink
    dlq: FakeDeadLetters
    admin: FakeAdmin
    metrics: Metrics
    dest: Destination
    misconfigured: list[str]

    def lines(self, n: int, start: int = 0, tp: TopicPart = P0) -> None:
        self.kafka.produce(tp, *(f"m v={i}i {i}".encode() for i in range(start, start + n)))

    def committed_to_end(self, *tps: TopicPart) -> bool:
        mine = self.kafka.committed(SPEC.group)
        return all(mine.get(tp) == self.kafka.end(tp) for tp in tps)

    def state(self) -> str:
        return self.dest.status.state

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(
            name, {"route": "r", "cluster": "b", **labels}
        )
        return value or 0.0


def make_rig(spec: DestinationSpec = SPEC) -> Rig:
    kafka = Kafka()
    source = FakeSource(kafka, spec.group)
    sink, dlq, admin = FakeSink(), FakeDeadLetters(), FakeAdmin(kafka)
    metrics = Metrics(CollectorRegistry())
    seen: list[str] = []
    dest = Destination(
        spec,
        sink=sink,
        admin=admin,
        dead_letters=dlq,
        metrics=metrics,
        on_misconfigured=lambda cluster, why: seen.append(why),
        source=source,
    )
    return Rig(kafka, source, sink, dlq, admin, metrics, dest, seen)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = make_rig()
    r.source.rebalance([P0])
    r.dest.start()
    yield r
    r.sink.release.set()
    r.dest.stop(timeout=10)


def test_active_destination_writes_everything_and_commits_to_the_end(rig: Rig) -> None:
    """Every message reaches the sink once and the group commits up to the end offset."""
    rig.lines(95)
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.committed_to_end(P0), timeout=10, what="commit to end")
    assert len(rig.sink.lines) == 95
    assert rig.state() == "active"


def test_unexpected_exception_in_a_write_is_a_failed_batch_not_a_stall(rig: Rig) -> None:
    """A write raising an exception nobody expected becomes a failed batch of kind internal,
    backs off, and the partition still commits to the end."""
    rig.sink.faults.append(ValueError("boom"))
    rig.lines(30)
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.committed_to_end(P0), timeout=10, what="commit to end")
    assert rig.counter("frouter_batch_failures_total", reason="internal") == 1
    assert {int(x.split(b"=")[1].split(b"i")[0]) for x in rig.sink.lines} == set(range(30))


def test_newly_assigned_partitions_of_an_active_standby_start_at_once(rig: Rig) -> None:
    """A standby already active that is assigned a dead replica's partition reads it at the
    takeover offset (the max over the route's groups), without any new command."""
    rig.lines(20, tp=P0)
    rig.lines(50, tp=P1)
    rig.kafka.commits["g.r.a"] = {P1: 30}  # the primary had written P1 up to 30
    rig.dest.activate(StartFrom.TAKEOVER)
    wait_until(lambda: rig.committed_to_end(P0), timeout=10, what="P0 done")
    rig.source.rebalance([P0, P1])
    wait_until(lambda: rig.committed_to_end(P0, P1), timeout=10, what="P1 read too")
    assert len(rig.sink.lines) == 20 + 20  # P1 from offset 30 only
    assert rig.dest.status.paused == ()


def test_dead_letter_outage_holds_the_partition_and_never_rewrites(rig: Rig) -> None:
    """With the dead-letter topic down the batch with a bad line is held (nothing committed past
    it, state blocked, error counted), later good lines still reach the sink, and once the topic
    works the letters are delivered without writing the batch again."""
    rig.dlq.broken = True
    rig.kafka.produce(P0, b"m bad=x 1", *(f"m v={i}i {i}".encode() for i in range(1, 10)))
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.state() == "blocked", timeout=10, what="blocked")
    rig.lines(20, start=10)
    wait_until(lambda: len(rig.sink.lines) == 29, timeout=10, what="later lines written")
    assert rig.kafka.committed(SPEC.group).get(P0, 0) == 0
    assert rig.counter("frouter_dead_letter_errors_total") >= 1
    assert "dead letters" in rig.dest.status.error
    rig.dlq.broken = False
    wait_until(lambda: rig.committed_to_end(P0), timeout=40, what="drained after the fix")
    assert len(rig.sink.lines) == 29  # the held batch was not written again
    assert [dl.line for dl in rig.dlq.letters] == [b"m bad=x 1"]
    wait_until(lambda: rig.state() == "active", timeout=5, what="active again")


def test_unavailable_sink_backs_off_then_rewinds_and_loses_nothing(rig: Rig) -> None:
    """A failing cluster sends the destination to backoff; once it works again the range is
    written from the committed offset and committed to the end."""
    rig.sink.down = True
    rig.lines(25)
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.state() == "backoff", timeout=10, what="backoff")
    rig.sink.down = False
    wait_until(lambda: rig.committed_to_end(P0), timeout=20, what="commit to end")
    assert {int(x.split(b"=")[1].split(b"i")[0]) for x in rig.sink.lines} == set(range(25))


def test_misconfigured_sink_stops_the_destination_and_commits_nothing(rig: Rig) -> None:
    """A 401 stops the destination loudly: state stopped, the engine told, nothing committed."""
    rig.sink.faults.append(misconfigured())
    rig.lines(5)
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.state() == "stopped", timeout=10, what="stopped")
    assert rig.misconfigured and "401" in rig.misconfigured[0]
    assert rig.kafka.committed(SPEC.group).get(P0, 0) == 0  # only the recorded start


def test_empty_last_message_still_commits_to_the_end(rig: Rig) -> None:
    """A partition whose newest message is empty commits past it (a hand-back can happen)."""
    rig.lines(3)
    rig.kafka.produce(P0, b"")
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.committed_to_end(P0), timeout=10, what="commit past the empty one")


def test_message_larger_than_a_batch_is_split_and_committed_once_whole() -> None:
    """A message of 300 lines with max_bytes 1,000 goes out in requests of at most 1,000
    bytes, and its offset is committed once every part landed."""
    r = make_rig(replace(SPEC, max_points=100_000, max_bytes=1000))
    big = b"\n".join(f"m,host=h{i:03} v={i}i {i}".encode() for i in range(300))
    r.kafka.produce(P0, big)
    r.source.rebalance([P0])
    r.dest.start()
    try:
        r.dest.activate(StartFrom.OWN)
        wait_until(lambda: r.committed_to_end(P0), timeout=10, what="commit")
        assert len(r.sink.lines) == 300
        assert max(r.sink.requests) <= 1000
        assert len(r.sink.requests) >= len(big) // 1000
    finally:
        r.dest.stop(timeout=10)


def test_graceful_deactivation_drains_then_pauses(rig: Rig) -> None:
    """A graceful deactivation writes and commits what was read, then the partitions pause."""
    rig.lines(7)  # fewer than a batch: only the linger or the drain sends them
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: len(rig.sink.lines) == 7, timeout=10, what="written")
    done = rig.dest.deactivate(graceful=True, reason="drain")
    assert done.wait(10)
    assert rig.committed_to_end(P0)
    wait_until(lambda: rig.state() == "paused", timeout=5, what="paused")
    assert rig.dest.status.paused == (P0,)


def test_revoke_while_a_write_hangs_returns_within_the_bound(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance does not wait for a hung cluster longer than REBALANCE_WAIT; the hung batch
    stays uncommitted (the next owner reads it again)."""
    monkeypatch.setattr(destination, "REBALANCE_WAIT", 0.5)
    rig.sink.hang.set()
    rig.lines(5)
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.dest.status.in_flight == 1, timeout=10, what="a write in flight")
    rig.source.rebalance([P1])
    wait_until(lambda: rig.source.revoke_seconds, timeout=10, what="revoke done")
    assert rig.source.revoke_seconds[0] < 2.0
    assert rig.kafka.committed(SPEC.group).get(P0, 0) == 0  # only the recorded start


def test_a_hung_write_shows_as_an_old_unsettled_batch(rig: Rig) -> None:
    """While a write hangs, the status reports the age of the oldest unsettled batch."""
    rig.sink.hang.set()
    rig.lines(5)
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.dest.status.oldest_unsettled > 0.3, timeout=10, what="aging batch")
    rig.sink.release.set()
    wait_until(lambda: rig.dest.status.oldest_unsettled == 0.0, timeout=10, what="settled")


def test_every_state_is_a_metric_with_one_current_state(rig: Rig) -> None:
    """frouter_destination_state has a sample per state, and exactly one of them is 1."""
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: rig.state() == "active", timeout=10, what="active")
    values = {s.value: rig.counter("frouter_destination_state", state=s.value) for s in State}
    assert values["active"] == 1
    assert sum(values.values()) == 1


def test_a_standby_remembers_its_window_and_replays_it_once_primary(rig: Rig) -> None:
    """A standby taking over at the primary's commit records the range it never held in its
    commit metadata; run later from its own commits (roles swapped) it replays that range."""
    rig.lines(50)
    rig.kafka.commits["g.r.a"] = {P0: 30}
    rig.dest.activate(StartFrom.TAKEOVER)
    wait_until(lambda: rig.committed_to_end(P0), timeout=10, what="standby at the end")
    assert len(rig.sink.lines) == 20
    assert rig.kafka.metadata[SPEC.group][P0] == "frouter:holes=0-30"
    assert rig.dest.deactivate(graceful=True, reason="swap").wait(10)
    rig.dest.activate(StartFrom.OWN)
    wait_until(lambda: len(rig.sink.lines) == 70, timeout=10, what="the window replayed")
    wait_until(lambda: rig.committed_to_end(P0), timeout=10, what="at the end again")
    assert {int(x.split(b"=")[1].split(b"i")[0]) for x in rig.sink.lines} == set(range(50))
    assert rig.kafka.metadata[SPEC.group][P0] == ""


def test_a_batch_closed_by_an_overflowing_message_holds_its_partition_back() -> None:
    """Small messages then one that overflows the batch, all in one poll: the first batch
    still records the partition, so while its write hangs nothing is committed past it."""
    r = make_rig(replace(SPEC, max_points=1000, max_bytes=100))
    gate = threading.Event()
    calls: list[int] = []
    write = r.sink.write

    def first_write_waits(payloads: Sequence[bytes]) -> list[Rejected]:
        calls.append(len(payloads))
        if len(calls) == 1:
            gate.wait(10)
        return write(payloads)

    r.sink.write = first_write_waits  # type: ignore[method-assign]
    r.kafka.produce(P0, *(f"m v={i}i {i}".encode() for i in range(5)), b"m v=5i " + b"5" * 70)
    r.source.rebalance([P0])
    r.dest.start()
    try:
        r.dest.activate(StartFrom.OWN)
        wait_until(lambda: len(calls) >= 2, timeout=10, what="both batches sent")
        wait_until(lambda: r.dest.status.in_flight == 1, timeout=10, what="second settled")
        assert r.kafka.committed(SPEC.group).get(P0, 0) == 0  # held behind the first batch
        gate.set()
        wait_until(lambda: r.committed_to_end(P0), timeout=10, what="commit to the end")
    finally:
        gate.set()
        r.dest.stop(timeout=10)

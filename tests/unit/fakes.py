"""Fault-injecting fakes of a destination's edges: its partition source (an in-memory log with
librdkafka's pause semantics), its sink, the offset reader and the dead-letter topic.

They stand in for Kafka and InfluxDB only in unit tests of the state machine; every claim of
delivery, failover or replay is also tested on the real stack (tests/integration).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from router.errors import SinkMisconfigured, SinkUnavailable, SourceError
from router.kafka import DeadLetter
from router.offsets import NO_OFFSET, Marks, TopicPart
from router.sink import Rejected
from router.source import OnAssign, OnRevoke, Record


@dataclass(frozen=True)
class Msg:
    _topic: str
    _partition: int
    _offset: int
    _value: bytes
    _ts: int | None = None  # CreateTime in ms; None: 1_700_000_000_000 + offset

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset if self._ts is None else self._ts)


@dataclass
class Kafka:
    """The logs and every group's commits, shared by sources and the offset reader."""

    logs: dict[TopicPart, list[bytes]] = field(default_factory=dict)
    commits: dict[str, dict[TopicPart, int]] = field(default_factory=dict)
    metadata: dict[str, dict[TopicPart, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def produce(self, tp: TopicPart, *values: bytes) -> None:
        with self.lock:
            self.logs.setdefault(tp, []).extend(values)

    def end(self, tp: TopicPart) -> int:
        with self.lock:
            return len(self.logs.get(tp, []))

    def committed(self, group: str) -> dict[TopicPart, int]:
        with self.lock:
            return dict(self.commits.get(group, {}))


class FakeSource:
    """A group member whose assignment the test sets; pause is sticky like librdkafka's."""

    def __init__(self, kafka: Kafka, group: str) -> None:
        self.kafka = kafka
        self.group = group
        self.out_of_range: list[TopicPart] = []
        self.assigned: list[TopicPart] = []
        self.paused: set[TopicPart] = set()
        self.position: dict[TopicPart, int] = {}
        self._next_assignment: list[TopicPart] | None = None
        self._cb: tuple[OnAssign, OnRevoke, OnRevoke] | None = None
        self.revoke_seconds: list[float] = []
        self.closed = False

    def rebalance(self, tps: Iterable[TopicPart]) -> None:
        """The next poll revokes everything and assigns ``tps`` (an eager rebalance)."""
        self._next_assignment = sorted(tps)

    def open(self, on_assign: OnAssign, on_revoke: OnRevoke, on_lost: OnRevoke) -> None:
        self._cb = (on_assign, on_revoke, on_lost)

    def poll(self, max_messages: int, timeout: float) -> Sequence[Record]:
        assert self._cb is not None
        if self._next_assignment is not None:
            new, self._next_assignment = self._next_assignment, None
            if self.assigned:
                started = time.monotonic()
                self._cb[1](list(self.assigned))
                self.revoke_seconds.append(time.monotonic() - started)
            self.assigned = new
            starts = self._cb[0](list(new))
            for tp in new:
                if tp in starts:
                    self.position[tp] = starts[tp]
                    self.paused.discard(tp)
                else:
                    self.paused.add(tp)
        out: list[Record] = []
        with self.kafka.lock:
            for tp in self.assigned:
                if tp in self.paused:
                    continue
                log = self.kafka.logs.get(tp, [])
                pos = self.position.get(tp, 0)
                while pos < len(log) and len(out) < max_messages:
                    out.append(Msg(tp[0], tp[1], pos, log[pos]))
                    pos += 1
                self.position[tp] = pos
        if not out and timeout:
            time.sleep(min(timeout, 0.01))
        return out

    def pause(self, tps: Sequence[TopicPart]) -> None:
        self.paused.update(tps)

    def start(self, starts: Mapping[TopicPart, int]) -> None:
        for tp, offset in starts.items():
            self.position[tp] = offset
            self.paused.discard(tp)

    def commit(
        self,
        offsets: Mapping[TopicPart, int],
        asynchronous: bool,
        metadata: Mapping[TopicPart, str] | None = None,
    ) -> None:
        with self.kafka.lock:
            self.kafka.commits.setdefault(self.group, {}).update(offsets)
            meta = self.kafka.metadata.setdefault(self.group, {})
            for tp in offsets:
                meta[tp] = (metadata or {}).get(tp, "")

    def close(self) -> None:
        self.closed = True


class FakeAdmin:
    def __init__(self, kafka: Kafka) -> None:
        self.kafka = kafka
        self.fail = False

    def committed(self, group: str, tps: Iterable[TopicPart]) -> dict[TopicPart, int]:
        if self.fail:
            raise SourceError("fake: broker unreachable")
        mine = self.kafka.committed(group)
        return {tp: mine.get(tp, NO_OFFSET) for tp in tps}

    def commits(self, group: str, tps: Iterable[TopicPart]) -> dict[TopicPart, tuple[int, str]]:
        offsets = self.committed(group, tps)
        with self.kafka.lock:
            meta = dict(self.kafka.metadata.get(group, {}))
        return {tp: (o, meta.get(tp, "")) for tp, o in offsets.items()}

    def watermarks(self, tps: Iterable[TopicPart]) -> dict[TopicPart, Marks]:
        if self.fail:
            raise SourceError("fake: broker unreachable")
        return {tp: Marks(0, self.kafka.end(tp)) for tp in tps}


class FakeSink:
    """Stores lines; refuses lines containing ``bad``; ``faults`` are raised one per write."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.requests: list[int] = []  # bytes per write call
        self.faults: list[Exception] = []
        self.down = False
        self.hang = threading.Event()  # set: writes block until ``release`` is set
        self.release = threading.Event()
        self.lock = threading.Lock()

    def write(self, payloads: Sequence[bytes]) -> list[Rejected]:
        if self.hang.is_set():
            self.release.wait(30)
        with self.lock:
            if self.faults:
                raise self.faults.pop(0)
            if self.down:
                raise SinkUnavailable("fake: connection refused", cluster="x")
            self.requests.append(sum(len(p) for p in payloads))
            refused = []
            for i, p in enumerate(payloads):
                for line in p.split(b"\n"):
                    if b"bad" in line:
                        refused.append(Rejected(index=i, line=line, reason="fake: bad line"))
                    elif line:
                        self.lines.append(line)
            return refused

    def close(self) -> None:
        pass


class FakeDeadLetters:
    topic = "dead"

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self.broken = False
        self.attempts = 0

    def send(self, letters: list[DeadLetter], timeout: float = 30.0) -> int:
        self.attempts += 1
        if self.broken:
            raise SourceError("fake: dead-letter topic unknown")
        self.letters.extend(letters)
        return len(letters)


def misconfigured() -> Exception:
    return SinkMisconfigured("fake: 401 unauthorized", cluster="x")

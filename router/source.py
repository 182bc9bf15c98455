"""Where a destination's partitions and messages come from: the seam between ``Destination``
and Kafka.

``AssignedSource`` is the one the router uses: a consumer that never joins a group; the route's
membership (``router/membership.py``) grants and revokes partitions, the source reads them with
``incremental_assign`` and commits to the destination's own group. The destination only sees
the ``PartitionSource`` interface (the callbacks as plain lists of partitions; ``on_assign``
answers where each newly granted partition starts, or nothing to keep it paused), so unit tests
give it an in-memory fake, and another way of owning partitions could take its place.

Only this module calls the consumer's assign/pause/resume/seek. A partition that starts is
assigned at its start offset AND explicitly resumed: librdkafka keeps an application pause on a
partition object across unassign/assign, so a partition paused while it belonged to this replica
once, then moved away and back, would otherwise be assigned "live" and never fetched.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from router.errors import SourceError
from router.kafka import client_config
from router.offsets import TopicPart
from router.secrets import scrub

log = structlog.get_logger("router")


class Record(Protocol):
    """What the destination reads of a message (confluent-kafka's ``Message`` fits)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...  # (type, ms); type 0: not available


OnAssign = Callable[[list[TopicPart]], Mapping[TopicPart, int]]
OnRevoke = Callable[[list[TopicPart]], None]


class PartitionSource(Protocol):
    out_of_range: list[TopicPart]  # partitions whose next offset left the log (drained by owner)

    def open(self, on_assign: OnAssign, on_revoke: OnRevoke, on_lost: OnRevoke) -> None: ...
    def poll(self, max_messages: int, timeout: float) -> Sequence[Record]: ...
    def pause(self, tps: Sequence[TopicPart]) -> None: ...
    def start(self, starts: Mapping[TopicPart, int]) -> None: ...
    def commit(
        self,
        offsets: Mapping[TopicPart, int],
        asynchronous: bool,
        metadata: Mapping[TopicPart, str] | None = None,
    ) -> None: ...
    def close(self) -> None: ...


def consumer_config(group: str, client_id: str, kafka_config: Mapping[str, str]) -> dict[str, str]:
    return {
        # defaults an operator may override in kafka.client_config
        "session.timeout.ms": "10000",  # a dead replica's partitions move in ~10 s
        "heartbeat.interval.ms": "1000",
        "queued.max.messages.kbytes": "16384",  # bounds librdkafka's prefetch
        "client.id": client_id,
        **kafka_config,
        # owned by the router (the topology refuses them in client_config)
        "group.id": group,
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        # Start offsets are always explicit; data deleted under a partition being read
        # must surface (and be counted), not be skipped silently by librdkafka.
        "auto.offset.reset": "error",
        "partition.assignment.strategy": "range,roundrobin",
    }


def _tps(tps: Sequence[TopicPart]) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t, p in tps]


class _ConsumerSource:
    """The consumer calls of a source: fetch, pause, start, commit (``AssignedSource`` adds
    who owns which partition)."""

    def __init__(self, group: str, client_id: str, kafka_config: Mapping[str, str]) -> None:
        self.out_of_range: list[TopicPart] = []
        self._known_topics: set[str] = set()
        try:
            config = client_config(consumer_config(group, client_id, kafka_config))
            self._consumer = Consumer(config)
        except KafkaException as exc:
            raise SourceError(f"cannot create the consumer of {group}: {scrub(str(exc))}") from exc

    def _assign_at(
        self, partitions: list[TopicPartition], starts: Mapping[TopicPart, int], incremental: bool
    ) -> None:
        """Assign ``partitions``: those in ``starts`` at their start offset and resumed (see
        the module docstring: never trust a stale pause), the others paused."""
        self._know_topics({tp.topic for tp in partitions})
        for tp in partitions:
            # explicit even when paused, so a paused partition never sits in an error
            # state; a later start() seeks it to its real start
            tp.offset = starts.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        if incremental:
            self._consumer.incremental_assign(partitions)
        else:
            self._consumer.assign(partitions)
        live = [tp for tp in partitions if (tp.topic, tp.partition) in starts]
        idle = [tp for tp in partitions if (tp.topic, tp.partition) not in starts]
        if idle:
            self._consumer.pause(idle)  # paused stays paused across a rebalance
        if live:
            self._consumer.resume(live)
            self._wake({(tp.topic, tp.partition): tp.offset for tp in live})

    def _know_topics(self, topics: set[str]) -> None:
        """Fetch the metadata of topics this consumer never read before its first assign:
        a consumer that never subscribed otherwise learns them on its next metadata refresh,
        up to a second after the assign (measured). Best effort: a failure changes nothing."""
        for topic in sorted(topics - self._known_topics):
            try:
                self._consumer.list_topics(topic, timeout=2.0)
                self._known_topics.add(topic)
            except KafkaException as exc:
                log.debug("topic_metadata_failed", topic=topic, error=str(exc))

    def _wake(self, starts: Mapping[TopicPart, int]) -> None:
        """Seek resumed partitions (again) to their start: librdkafka's resume does not wake
        the fetcher, whose next wake-up may be a second away; a seek does. Best effort."""
        try:
            for (t, p), offset in starts.items():
                self._consumer.seek(TopicPartition(t, p, offset))
        except KafkaException as exc:
            log.debug("wake_seek_failed", error=str(exc))

    def poll(self, max_messages: int, timeout: float) -> Sequence[Record]:
        return self._fetch(max_messages, timeout)

    def _fetch(self, max_messages: int, timeout: float) -> Sequence[Record]:
        try:
            msgs = self._consumer.consume(num_messages=max_messages, timeout=timeout)
        except KafkaException as exc:
            raise SourceError(f"consume failed: {exc}") from exc
        if not msgs or list(map(type(msgs[0]).error, msgs)).count(None) == len(msgs):
            return msgs  # no error among them (checked in C, not per message in Python)
        good = []
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.code() == KafkaError._AUTO_OFFSET_RESET:
                self.out_of_range.append((m.topic() or "", m.partition() or 0))
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume_error", error=str(err))
        return good

    def pause(self, tps: Sequence[TopicPart]) -> None:
        if tps:
            try:
                self._consumer.pause(_tps(tps))
            except KafkaException as exc:
                raise SourceError(f"pause failed: {exc}") from exc

    def start(self, starts: Mapping[TopicPart, int]) -> None:
        """Seek each partition to its start and resume it."""
        if not starts:
            return
        try:
            for (t, p), offset in starts.items():
                self._consumer.seek(TopicPartition(t, p, offset))
            self._consumer.resume(_tps(list(starts)))
        except KafkaException as exc:
            raise SourceError(f"seek/resume failed: {exc}") from exc
        self._wake(starts)

    def commit(
        self,
        offsets: Mapping[TopicPart, int],
        asynchronous: bool,
        metadata: Mapping[TopicPart, str] | None = None,
    ) -> None:
        meta = metadata or {}
        tps = [
            TopicPartition(t, p, o, metadata=meta.get((t, p), "")) for (t, p), o in offsets.items()
        ]
        if not tps:
            return
        try:
            if asynchronous:
                self._consumer.commit(offsets=tps, asynchronous=True)
            else:
                self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            raise SourceError(f"commit failed: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(KafkaException, RuntimeError):
            self._consumer.close()  # leaves the group: the partitions move at once


class AssignedSource(_ConsumerSource):
    """A consumer that never joins a group: the route's ``RouteMembership`` grants and revokes
    partitions (``router/membership.py``); it reads them with ``incremental_assign`` and
    commits to the destination group. ``grant``/``revoke``/``fence`` are called from the
    membership thread; the callbacks run on the destination thread inside ``poll``."""

    def __init__(
        self,
        group: str,
        client_id: str,
        kafka_config: Mapping[str, str],
        on_close: Callable[[AssignedSource], None] = lambda source: None,
    ) -> None:
        super().__init__(group, client_id, kafka_config)
        self._on_close = on_close
        self._requests: queue.Queue[tuple[list[TopicPart], threading.Event | None]] = queue.Queue()
        self._assigned: set[TopicPart] = set()
        self._fenced: set[TopicPart] = set()
        self._commit_lock = threading.Lock()
        self._closed = False
        self._callbacks: tuple[OnAssign, OnRevoke, OnRevoke] | None = None

    # --- membership thread ---

    def grant(self, tps: Sequence[TopicPart]) -> None:
        with self._commit_lock:  # ours again from now (a late, stale grant cannot unfence)
            self._fenced.difference_update(tps)
        self._requests.put((list(tps), None))

    def revoke(self, tps: Sequence[TopicPart]) -> threading.Event:
        done = threading.Event()
        if self._closed:
            done.set()
        else:
            self._requests.put((list(tps), done))
        return done

    def fence(self, tps: Sequence[TopicPart]) -> None:
        with self._commit_lock:  # no commit in progress once this returns
            self._fenced.update(tps)

    # --- destination thread ---

    def open(self, on_assign: OnAssign, on_revoke: OnRevoke, on_lost: OnRevoke) -> None:
        self._callbacks = (on_assign, on_revoke, on_lost)

    def poll(self, max_messages: int, timeout: float) -> Sequence[Record]:
        while True:
            try:
                tps, done = self._requests.get_nowait()
            except queue.Empty:
                break
            if done is None:
                self._grant(tps)
            else:
                self._revoke(tps)
                done.set()
        return self._fetch(max_messages, timeout)

    def _grant(self, tps: list[TopicPart]) -> None:
        assert self._callbacks is not None
        new = sorted(tp for tp in tps if tp not in self._assigned)
        if not new:
            return
        starts = self._callbacks[0](new)
        try:
            self._assign_at(_tps(new), starts, incremental=True)
        except KafkaException as exc:
            raise SourceError(f"assign failed: {exc}") from exc
        self._assigned.update(new)

    def _revoke(self, tps: list[TopicPart]) -> None:
        assert self._callbacks is not None
        mine = sorted(tp for tp in tps if tp in self._assigned)
        if not mine:
            return
        self._callbacks[1](mine)  # commits what landed, forgets the rest
        self._assigned.difference_update(mine)
        try:
            self._consumer.incremental_unassign(_tps(mine))
        except KafkaException as exc:
            raise SourceError(f"unassign failed: {exc}") from exc

    def commit(
        self,
        offsets: Mapping[TopicPart, int],
        asynchronous: bool,
        metadata: Mapping[TopicPart, str] | None = None,
    ) -> None:
        with self._commit_lock:
            allowed = {tp: o for tp, o in offsets.items() if tp not in self._fenced}
            super().commit(allowed, asynchronous, metadata)

    def close(self) -> None:
        self._closed = True
        while True:  # a revoke nobody will process any more: acknowledge it
            try:
                _, done = self._requests.get_nowait()
            except queue.Empty:
                break
            if done is not None:
                done.set()
        self._on_close(self)
        super().close()

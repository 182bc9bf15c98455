"""The Kafka adapter for everything that is not the consume loop: group offsets, watermarks,
topic discovery and dead letters. confluent-kafka errors become ``SourceError`` here.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec

from router.errors import SourceError
from router.offsets import TopicPart

NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: the group never committed this partition


_EARLIEST: OffsetSpec = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
_LATEST: OffsetSpec = OffsetSpec.latest()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Watermarks:
    low: int  # earliest offset still in the log (retention moves it up)
    high: int  # the offset the next produced message will get


class KafkaAdmin:
    """Reads any group's committed offsets and the partitions' watermarks."""

    def __init__(self, config: Mapping[str, str], timeout: float = 10.0) -> None:
        self._config = dict(config)
        self._admin = AdminClient(dict(config))
        self._timeout = timeout
        self._readers: dict[str, tuple[Consumer, threading.Lock]] = {}
        self._readers_lock = threading.Lock()

    def partitions(self, topics: Iterable[str]) -> list[TopicPart]:
        """Every partition of the named topics; a name starting with ``^`` is a regex."""
        try:
            md = self._admin.list_topics(timeout=self._timeout)
        except KafkaException as exc:
            raise SourceError(f"cannot list topics: {exc}") from exc
        wanted = list(topics)
        names: set[str] = set()
        for pattern in wanted:
            if pattern.startswith("^"):
                rx = re.compile(pattern)
                names.update(t for t in md.topics if rx.match(t) and not t.startswith("__"))
            elif pattern in md.topics:
                names.add(pattern)
        return sorted((t, p) for t in names for p in md.topics[t].partitions)

    def committed(self, group: str, tps: Iterable[TopicPart]) -> dict[TopicPart, int]:
        """The group's committed offset per partition (NO_OFFSET where it has none).

        Read with a consumer handle of that group that never subscribes (so it never joins),
        not with AdminClient.list_consumer_group_offsets: librdkafka 2.16 crashes (SIGSEGV in
        rd_kafka_handle_OffsetFetch -> rd_kafka_cgrp_op on an admin handle) when that request
        meets a retriable error such as COORDINATOR_LOAD_IN_PROGRESS on a fresh broker.
        """
        req = [TopicPartition(t, p) for t, p in tps]
        if not req:
            return {}
        reader, lock = self._reader(group)
        try:
            with lock:
                result = reader.committed(req, timeout=self._timeout)
        except KafkaException as exc:
            raise SourceError(f"cannot read committed offsets of {group}: {exc!r}") from exc
        out: dict[TopicPart, int] = {}
        for tp in result:
            if tp.error is not None:
                raise SourceError(
                    f"committed offset of {group} {tp.topic}[{tp.partition}]: {tp.error}"
                )
            out[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else NO_OFFSET
        return out

    def _reader(self, group: str) -> tuple[Consumer, threading.Lock]:
        with self._readers_lock:
            entry = self._readers.get(group)
            if entry is None:
                consumer = Consumer(
                    {**self._config, "group.id": group, "enable.auto.commit": "false"}
                )
                entry = (consumer, threading.Lock())
                self._readers[group] = entry
            return entry

    def close(self) -> None:
        with self._readers_lock:
            readers = list(self._readers.values())
            self._readers = {}
        for consumer, lock in readers:
            with lock, contextlib.suppress(KafkaException, RuntimeError):
                consumer.close()

    def watermarks(self, tps: Iterable[TopicPart]) -> dict[TopicPart, Watermarks]:
        """Low and high watermark per partition."""
        parts = [TopicPartition(t, p) for t, p in tps]
        if not parts:
            return {}
        try:
            lows = self._admin.list_offsets(
                {tp: _EARLIEST for tp in parts}, request_timeout=self._timeout
            )
            highs = self._admin.list_offsets(
                {tp: _LATEST for tp in parts}, request_timeout=self._timeout
            )
            return {
                (tp.topic, tp.partition): Watermarks(
                    lows[tp].result(timeout=self._timeout).offset,
                    highs[tp].result(timeout=self._timeout).offset,
                )
                for tp in parts
            }
        except (KafkaException, TimeoutError) as exc:
            raise SourceError(f"cannot list offsets: {exc!r}") from exc

    def lag(self, group: str, tps: Iterable[TopicPart]) -> dict[TopicPart, int]:
        """Messages the group has not committed yet, per partition (never negative).

        A partition the group never committed counts from the low watermark.
        """
        parts = list(tps)
        marks = self.watermarks(parts)
        committed = self.committed(group, parts)
        out = {}
        for tp in parts:
            wm = marks[tp]
            pos = committed.get(tp, NO_OFFSET)
            start = wm.low if pos < 0 else max(pos, wm.low)
            out[tp] = max(0, wm.high - start)
        return out


@dataclass(frozen=True)
class DeadLetter:
    line: bytes
    reason: str
    topic: str
    partition: int
    offset: int
    cluster: str
    route: str


class DeadLetterProducer:
    """Sends rejected lines to the dead-letter topic, confirmed before their batch commits."""

    def __init__(self, config: Mapping[str, str], topic: str) -> None:
        self.topic = topic
        self._producer = Producer(
            {**config, "enable.idempotence": "true", "linger.ms": "5", "acks": "all"}
        )

    def send(self, letters: Iterable[DeadLetter], timeout: float = 30.0) -> int:
        """Produce and wait for every delivery; raise SourceError unless all were stored."""
        failures: list[str] = []
        sent = 0

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        try:
            for dl in letters:
                headers: dict[str, str | bytes | None] = {
                    "reason": dl.reason.encode(),
                    "source_topic": dl.topic.encode(),
                    "source_partition": str(dl.partition).encode(),
                    "source_offset": str(dl.offset).encode(),
                    "cluster": dl.cluster.encode(),
                    "route": dl.route.encode(),
                }
                self._producer.produce(
                    self.topic, value=dl.line, headers=headers, on_delivery=on_delivery
                )
                sent += 1
            remaining = self._producer.flush(timeout)
        except (KafkaException, BufferError) as exc:
            raise SourceError(f"dead-letter produce to {self.topic} failed: {exc}") from exc
        if remaining or failures:
            raise SourceError(
                f"dead-letter produce to {self.topic}: {len(failures)} failed, "
                f"{remaining} unconfirmed: {failures[:1]}"
            )
        return sent

    def close(self) -> None:
        self._producer.flush(10)

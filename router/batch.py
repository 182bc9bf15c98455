"""Batches of Kafka message values on their way to one InfluxDB cluster, with no I/O.

A ``Batcher`` collects messages until a batch is full (points or bytes) or has lingered long
enough. A message larger than ``max_bytes`` is split at line boundaries (InfluxDB's own scanner
rules) into parts that travel in successive batches; the message's offset becomes committable
only with its last part, so memory follows the batch size, never the largest message.

Per partition a batch records ``last``: the highest offset whose message is complete in it (its
commit is ``last + 1``). A message with nothing to write (empty, or every graphite line refused)
still advances ``last``, so a partition whose newest message is empty still commits to the end.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import add

from router.kafka import DeadLetter
from router.offsets import TopicPart
from router.sink import split_lines


@dataclass
class Batch:
    batch_id: int
    values: list[bytes] = field(default_factory=list)
    origins: list[TopicPart] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    last: dict[TopicPart, int] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)  # refused before the write (graphite)
    points: int = 0
    messages: int = 0  # messages complete in this batch
    size: int = 0
    started: float = 0.0  # monotonic time of the first message in it
    # set by the owner when the batch is handed to the writers
    generation: int = 0
    submitted: float = 0.0
    # set by the writer: the sink accepted the values; only ``letters`` remain to deliver
    written: bool = False
    refused: int = 0  # lines InfluxDB refused
    letters: list[DeadLetter] = field(default_factory=list)  # refused lines + ``dead``
    letters_delivered: bool = False  # confirmed by the dead-letter topic

    def empty(self) -> bool:
        return not self.values and not self.dead and not self.last

    def _touch(self) -> None:
        if self.empty():
            self.started = time.monotonic()

    def add(self, tp: TopicPart, offset: int, value: bytes, *, complete: bool = True) -> None:
        """Add a message (or, ``complete=False``, a part of one that is not its last)."""
        self._touch()
        self.values.append(value)
        self.origins.append(tp)
        self.offsets.append(offset)
        self.points += value.count(b"\n") + (0 if value.endswith(b"\n") else 1)
        self.size += len(value) + 1
        self.messages += 1 if complete else 0
        self.advance(tp, offset if complete else offset - 1)

    def advance_all(self, lasts: dict[TopicPart, int]) -> None:
        """``advance`` for several partitions (offsets only grow within a partition)."""
        if self.empty():
            self.started = time.monotonic()
        self.last.update(lasts)

    def advance(self, tp: TopicPart, last: int) -> None:
        """Record that every message of ``tp`` up to ``last`` is complete in or before this
        batch (a message with nothing to write still moves the commit)."""
        self._touch()
        self.last[tp] = max(self.last.get(tp, last), last)


class Batcher:
    """Collects messages into batches of at most ``max_points`` points / ``max_bytes`` bytes."""

    def __init__(self, max_points: int, max_bytes: int, linger: float) -> None:
        self.max_points = max_points
        self.max_bytes = max_bytes
        self.linger = linger
        self._next_id = 1
        self.current = Batch(self._next_id)

    def add(self, tp: TopicPart, offset: int, value: bytes) -> list[Batch]:
        """Add one message; return the batches that became full (to be written now).

        A batch never grows past ``max_bytes`` (unless one line alone is larger)."""
        parts = [value] if len(value) <= self.max_bytes else self._split(value)
        full: list[Batch] = []
        last = len(parts) - 1
        for i, part in enumerate(parts):
            if self.current.values and self.current.size + len(part) + 1 > self.max_bytes:
                full.append(self.take())
            self.current.add(tp, offset, part, complete=i == last)
            if self._full():
                full.append(self.take())
        return full

    def add_run(
        self,
        tps: Sequence[TopicPart],
        offsets: Sequence[int],
        values: Sequence[bytes],
        *,
        one_line_each: bool | None = None,
        lasts: dict[TopicPart, int] | None = None,
    ) -> list[Batch]:
        """``add`` for a run of messages at once: Python work per run and per batch, not per
        message (the hot path). Every value must be non-empty and at most ``max_bytes`` long.
        Batches close where ``add`` closes them: at the message that reaches ``max_points``
        (included) or before the message that would take a batch past ``max_bytes``.

        The caller may pass what it already knows: ``one_line_each`` (no value holds a newline)
        and ``lasts`` (the last offset of each partition in the run)."""
        n = len(values)
        if one_line_each is None:
            one_line_each = b"\n".join(values).count(b"\n") == n - 1
        # cum_points[k]: points of values[0..k]; None while every value is one line (k + 1)
        cum_points: list[int] | None = None
        if not one_line_each:
            cum_points = list(accumulate(v.count(b"\n") + (v[-1] != 10) for v in values))
        cum_size = list(accumulate(map(add, map(len, values), repeat(1))))
        full: list[Batch] = []
        i = 0
        while i < n:
            b = self.current
            if b.empty():
                b.started = time.monotonic()
            if cum_points is None:
                points_before = i
                k_points = max(self.max_points - b.points + i - 1, i)
            else:
                points_before = cum_points[i - 1] if i else 0
                k_points = bisect_left(cum_points, self.max_points - b.points + points_before, i)
            size_before = cum_size[i - 1] if i else 0
            k_bytes = bisect_right(cum_size, self.max_bytes - b.size + size_before, i)
            if k_bytes == i and b.values:  # the next message does not fit: close this batch
                full.append(self.take())
                continue
            end = min(k_points + 1, max(k_bytes, i + 1), n)
            b.values.extend(values[i:end])
            b.origins.extend(tps[i:end])
            b.offsets.extend(offsets[i:end])
            b.points += (end if cum_points is None else cum_points[end - 1]) - points_before
            b.size += cum_size[end - 1] - size_before
            b.messages += end - i
            if lasts is not None and i == 0 and end == n:
                b.last.update(lasts)
            else:
                b.last.update(zip(tps[i:end], offsets[i:end], strict=True))
            if end < n or b.points >= self.max_points or b.size >= self.max_bytes:
                full.append(self.take())
            i = end
        return full

    def _split(self, value: bytes) -> list[bytes]:
        parts: list[bytes] = []
        chunk: list[bytes] = []
        size = 0
        for line in split_lines(value):
            if chunk and size + len(line) + 1 > self.max_bytes:
                parts.append(b"\n".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            parts.append(b"\n".join(chunk))
        return parts or [value]

    def _full(self) -> bool:
        b = self.current
        return b.points >= self.max_points or b.size >= self.max_bytes

    def due(self, now: float) -> bool:
        """The current batch has waited ``linger`` seconds since its first message."""
        return not self.current.empty() and now - self.current.started >= self.linger

    def take(self) -> Batch:
        """The current batch (maybe empty); a fresh one replaces it."""
        batch = self.current
        self._next_id += 1
        self.current = Batch(self._next_id)
        return batch

    def drop(self) -> None:
        """Forget what is buffered (it is read again from the committed offsets)."""
        self.take()

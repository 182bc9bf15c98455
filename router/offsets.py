"""Commit-after-write bookkeeping, per partition, with no I/O.

A batch may hold messages of several partitions. For each partition the tracker keeps the
batches in the order they were sent; an offset becomes committable only when its batch and
every earlier batch of that partition were accepted by InfluxDB. So the committed offset never
passes a batch still in flight, and a failed batch holds its partition's commits back for good
(the destination then rewinds to its committed offset and sends the range again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TopicPart = tuple[str, int]


@dataclass
class _Pending:
    batch_id: int
    next_offset: int  # the offset to commit once this batch and all before it are done
    done: bool = False


class OffsetTracker:
    """Which offsets of which partitions may be committed, given batches in flight."""

    def __init__(self) -> None:
        self._pending: dict[TopicPart, deque[_Pending]] = {}
        self._batches: dict[int, list[TopicPart]] = {}

    def add(self, batch_id: int, last_offsets: Mapping[TopicPart, int]) -> None:
        """Record a batch sent with, per partition, the highest offset it contains."""
        if batch_id in self._batches:
            raise ValueError(f"batch {batch_id} already tracked")
        self._batches[batch_id] = list(last_offsets)
        for tp, last in last_offsets.items():
            self._pending.setdefault(tp, deque()).append(_Pending(batch_id, last + 1))

    def complete(self, batch_id: int) -> dict[TopicPart, int]:
        """Mark a batch accepted; return the offsets that became committable, per partition."""
        ready: dict[TopicPart, int] = {}
        for tp in self._batches.pop(batch_id, []):
            queue = self._pending.get(tp)
            if not queue:
                continue
            for pending in queue:
                if pending.batch_id == batch_id:
                    pending.done = True
                    break
            while queue and queue[0].done:
                ready[tp] = queue.popleft().next_offset
        return ready

    def fail(self, batch_id: int) -> list[TopicPart]:
        """Forget a failed batch; return its partitions (each must rewind to its commit)."""
        return list(self._batches.pop(batch_id, []))

    def in_flight(self, tp: TopicPart | None = None) -> int:
        """Batches not yet completed (for one partition, or in all)."""
        if tp is None:
            return len(self._batches)
        return sum(1 for p in self._pending.get(tp, ()) if not p.done)

    def drop(self, tps: Iterable[TopicPart]) -> None:
        """Stop tracking partitions (revoked or rewound); their pending results are ignored."""
        for tp in tps:
            self._pending.pop(tp, None)
        for batch_id, parts in list(self._batches.items()):
            kept = [tp for tp in parts if tp in self._pending]
            if kept:
                self._batches[batch_id] = kept
            else:
                del self._batches[batch_id]


# --- where a destination starts reading ------------------------------------------------------

NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: the group never committed this partition


@dataclass(frozen=True)
class Marks:
    """A partition's watermarks: ``low`` the earliest offset still in the log, ``high`` the
    offset the next produced message gets."""

    low: int
    high: int


@dataclass(frozen=True)
class StartPlan:
    """Where each partition starts, and what must be recorded before it does.

    ``gaps``: partition -> (first lost offset, earliest offset still in Kafka): retention loss.
    ``skips``: partition -> (first skipped offset, next offset read): a returning primary's jump.
    ``record``: offsets to commit at once as this group's progress (a gap or skip is then counted
    once, and data deleted before we write it is noticed as lost, not silently skipped).
    """

    starts: dict[TopicPart, int]
    gaps: dict[TopicPart, tuple[int, int]]
    skips: dict[TopicPart, tuple[int, int]]
    record: dict[TopicPart, int]


def start_offsets(
    mode: str,
    own: Mapping[TopicPart, int],
    peers: Iterable[Mapping[TopicPart, int]],
    watermarks: Mapping[TopicPart, Marks],
) -> StartPlan:
    """The start offset of every partition in ``watermarks``, as a pure function.

    ``mode`` is ``own`` (the destination's own commit: replay what it missed), ``takeover``
    (the max over its own and every peer group's commit: pick up where the route is) or
    ``skip`` (like takeover; the range between its own commit and the start is a recorded
    skip). A partition no group ever committed starts at the low watermark (a partition just
    added to the topic starts at 0); a commit below the low watermark starts at the low
    watermark and records the difference as a retention gap; no start is above the high mark.
    """
    peer_maps = list(peers) if mode != "own" else []
    plan = StartPlan({}, {}, {}, {})
    for tp, wm in watermarks.items():
        mine = own.get(tp, NO_OFFSET)
        s = max([mine, *(p.get(tp, NO_OFFSET) for p in peer_maps)])
        if s < 0:
            s = wm.low
            plan.record[tp] = s
        elif s < wm.low:
            plan.gaps[tp] = (s, wm.low)
            s = wm.low
            plan.record[tp] = s
        s = min(s, wm.high)
        if mode == "skip":
            base = wm.low if mine < 0 or tp in plan.gaps else mine
            if s > base:
                plan.skips[tp] = (base, s)
                plan.record[tp] = s
        plan.starts[tp] = s
    return plan

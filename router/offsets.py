"""Commit-after-write bookkeeping, per partition, with no I/O.

A batch may hold messages of several partitions. For each partition the tracker keeps the
batches in the order they were sent; an offset becomes committable only when its batch and
every earlier batch of that partition were accepted by InfluxDB. So the committed offset never
passes a batch still in flight, and a failed batch holds its partition's commits back for good
(the destination then rewinds to its committed offset and sends the range again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
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


Hole = tuple[int, int]  # [first, next): offsets a group's cluster never received
MAX_HOLES = 32  # kept per partition in the commit metadata (offset.metadata.max.bytes: 4096)
_HOLES_PREFIX = "frouter:holes="


def encode_holes(holes: Sequence[Hole]) -> str:
    """Commit metadata saying which ranges below the commit the cluster does not hold."""
    return _HOLES_PREFIX + ",".join(f"{a}-{b}" for a, b in holes) if holes else ""


def decode_holes(metadata: str | None) -> tuple[Hole, ...]:
    """The holes in a commit's metadata; anything else (other tools' metadata) is no hole."""
    if not metadata or not metadata.startswith(_HOLES_PREFIX):
        return ()
    out: list[Hole] = []
    for part in metadata[len(_HOLES_PREFIX) :].split(","):
        a, sep, b = part.partition("-")
        if sep and a.isdigit() and b.isdigit() and int(a) < int(b):
            out.append((int(a), int(b)))
    return merge_holes(out)


def merge_holes(holes: Iterable[Hole], limit: int = MAX_HOLES) -> tuple[Hole, ...]:
    """Sorted, overlapping or touching holes joined; beyond ``limit``, the two closest are
    joined (the range between them is then replayed again: a duplicate, never a loss)."""
    merged: list[Hole] = []
    for a, b in sorted(holes):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    while len(merged) > limit:
        i = min(range(len(merged) - 1), key=lambda k: merged[k + 1][0] - merged[k][1])
        merged[i : i + 2] = [(merged[i][0], merged[i + 1][1])]
    return tuple(merged)


@dataclass(frozen=True)
class StartPlan:
    """Where each partition starts, and what must be recorded before it does.

    ``gaps``: partition -> (first offset, earliest offset still in Kafka, messages lost): what
    this cluster can never get (retention).
    ``skips``: partition -> (first skipped offset, next offset read): a returning primary's jump.
    ``record``: offsets to commit at once as this group's progress (a gap or skip is then counted
    once, and data deleted before we write it is noticed as lost, not silently skipped).
    ``holes``: partition -> the ranges below its commits this cluster does not hold, to carry in
    the commit metadata from now on.
    """

    starts: dict[TopicPart, int]
    gaps: dict[TopicPart, tuple[int, int, int]]
    skips: dict[TopicPart, tuple[int, int]]
    record: dict[TopicPart, int]
    holes: dict[TopicPart, tuple[Hole, ...]]


def start_offsets(
    mode: str,
    own: Mapping[TopicPart, int],
    peers: Iterable[Mapping[TopicPart, int]],
    watermarks: Mapping[TopicPart, Marks],
    holes: Mapping[TopicPart, Sequence[Hole]] | None = None,
) -> StartPlan:
    """The start offset of every partition in ``watermarks``, as a pure function.

    ``mode`` is ``own`` (a primary or mirror: its own commit, replaying what it missed, and
    first every hole it has: a cluster that was a standby once holds only the windows it
    covered), ``takeover`` (a standby: the max over its own and every peer group's commit,
    the range it skips becoming a new hole) or ``skip`` (a returning primary with
    ``skip_missed``: like takeover, the jump recorded as a skip, not a hole). A partition no group
    ever committed starts at the low watermark (a partition just added starts at 0); what lies
    below the low watermark and was never written is a retention gap; no start is above the
    high mark.
    """
    peer_maps = list(peers) if mode != "own" else []
    known = holes or {}
    plan = StartPlan({}, {}, {}, {}, {})
    for tp, wm in watermarks.items():
        mine = own.get(tp, NO_OFFSET)
        have = merge_holes(h for h in known.get(tp, ()) if mine < 0 or h[0] < mine)
        if mode == "own" and have and mine >= 0:
            s = min(mine, have[0][0])  # replay every range this cluster never received
            lost = sum(max(0, min(b, wm.low) - a) for a, b in have) + max(0, wm.low - mine)
            if s < wm.low:
                plan.gaps[tp] = (s, wm.low, lost)
                s = wm.low
            plan.record[tp] = min(s, wm.high)
            have = ()
        else:
            s = max([mine, *(p.get(tp, NO_OFFSET) for p in peer_maps)])
            if s < 0:
                s = wm.low
                plan.record[tp] = s
            elif s < wm.low:
                plan.gaps[tp] = (s, wm.low, wm.low - s)
                s = wm.low
                plan.record[tp] = s
            if mode == "takeover" and s > max(mine, wm.low):
                have = merge_holes([*have, (max(mine, wm.low), s)])
                plan.record[tp] = min(s, wm.high)
        s = min(s, wm.high)
        if mode == "skip":
            base = wm.low if mine < 0 or tp in plan.gaps else mine
            if s > base:
                plan.skips[tp] = (base, s)
                plan.record[tp] = s
        plan.starts[tp] = s
        plan.holes[tp] = have
    return plan

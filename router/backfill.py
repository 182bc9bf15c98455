"""Backfill: write a time range of a route's topics to one cluster again, from Kafka.

The most common recovery after a cluster lost data (a wiped or rebuilt InfluxDB): read the
route's topics from ``--since`` (``--until``, default: the end offsets when the run starts)
and write them to the cluster through the router's own write path (``router.writer.WritePool``:
the same ``InfluxSink`` with its retries and node rotation, the same dead-letter producer for
lines InfluxDB refuses, the same batches and commit-after-write bookkeeping). Points InfluxDB
already holds are overwritten with themselves (same series and timestamp), so a backfill over
data that survived is harmless.

Progress is the consumer group ``{group_prefix}.{route}.{cluster}.backfill``: never the live
group, so the running router's offsets never move. Its commits carry the run's range in their
metadata; a run with the same ``--since``/``--until`` resumes from them (after Ctrl-C, a crash,
a lost connection), another range (or ``--restart``) starts over. The consumer never joins the
group (``assign()``), so it may run beside the router.

Where the range starts is Kafka's ``offsets_for_times``. If Kafka no longer holds the start of
the range (the earliest retained message is younger than ``--since`` and earlier offsets were
deleted), the backfill refuses, saying per partition how much is gone and from when the data
is still there; so does a range deleted while the backfill reads it.

Threads: the caller's thread reads Kafka and settles outcomes; the write pool's threads write.
``stop()`` (from a signal handler) makes ``run`` finish its in-flight writes, commit and return.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from router.backoff import backoff_delay
from router.batch import Batch, Batcher
from router.errors import RouterError, SourceError
from router.graphite import GraphiteConverter
from router.kafka import DeadLetter, client_config
from router.offsets import NO_OFFSET, Marks, OffsetTracker, TopicPart
from router.source import Record
from router.stamp import Precision, kafka_time, lacks_timestamp, stamp_lines
from router.topology import parse_duration
from router.writer import DeadLetters, Outcome, Sink, WritePool

log = structlog.get_logger("router.backfill")

META_VERSION = 1


class BackfillError(RouterError):
    """The backfill cannot run or cannot go on (unknown route, retention, misconfigured)."""


# --- pure parts -----------------------------------------------------------------------------


def parse_time(text: str, now: float) -> float:
    """``--since``/``--until``: ISO 8601 (``2026-11-20T00:00Z``, ``2026-11-20 00:00:00+01:00``;
    without a zone: UTC), ``now``, or a duration ago (``90m``, ``6h``, ``2d``). Seconds since
    the epoch. Raises ValueError with what is accepted."""
    raw = text.strip()
    if raw == "now":
        return now
    if raw and raw[-1] in "smhd" and raw[0].isdigit():
        days = raw.endswith("d")
        try:
            ago = float(raw[:-1]) * 86400 if days else parse_duration(raw)
        except ValueError:
            ago = None
        if ago is not None:
            return now - ago
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601 (2026-11-20T00:00Z), 'now', or a duration "
            "ago (90m, 6h, 2d)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def span(seconds: float) -> str:
    """``3 d 4 h``, ``5 h 2 min``, ``12 min``, ``40 s``."""
    s = int(max(0.0, seconds))
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min"
    return f"{s} s"


def range_meta(since: float, until: float | None, first: int, end: int) -> str:
    """The commit metadata of one partition: the run's range, so a rerun knows it is the same."""
    return json.dumps(
        {"v": META_VERSION, "since": since, "until": until, "first": first, "end": end},
        separators=(",", ":"),
    )


@dataclass(frozen=True)
class Plan:
    """Where a run reads: per partition ``start`` (resumed or first) up to ``end``
    (exclusive); ``first`` is where the range began (progress counts from it)."""

    first: Mapping[TopicPart, int]
    start: Mapping[TopicPart, int]
    end: Mapping[TopicPart, int]
    resumed: bool

    @property
    def total(self) -> int:
        return sum(max(0, self.end[tp] - self.first[tp]) for tp in self.end)

    def done(self, position: Mapping[TopicPart, int]) -> int:
        """Messages of the range behind ``position`` (the next offset to write)."""
        return sum(
            max(0, min(position.get(tp, self.start[tp]), self.end[tp]) - self.first[tp])
            for tp in self.end
        )


def plan_range(
    *,
    since: float,
    until: float | None,
    since_offsets: Mapping[TopicPart, int],
    end_offsets: Mapping[TopicPart, int],
    commits: Mapping[TopicPart, tuple[int, str]],
    restart: bool = False,
) -> Plan:
    """The range to write, resumed from ``commits`` (the backfill group's offsets and their
    metadata) when every partition's commit records this same range (``since``, ``until``);
    otherwise from the start. A resumed run keeps the first run's end offsets (an open-ended
    range does not grow with the stream while it is resumed)."""
    first = dict(since_offsets)
    end = {tp: max(end_offsets[tp], first[tp]) for tp in first}
    if not restart and first:
        saved: dict[TopicPart, dict[str, Any]] = {}
        for tp in first:
            offset, meta = commits.get(tp, (NO_OFFSET, ""))
            try:
                doc = json.loads(meta) if meta else {}
            except ValueError:
                doc = {}
            if (
                offset < 0
                or not isinstance(doc, dict)
                or doc.get("v") != META_VERSION
                or doc.get("since") != since
                or doc.get("until") != until
            ):
                break
            saved[tp] = {**doc, "offset": offset}
        else:
            return Plan(
                first={tp: int(d["first"]) for tp, d in saved.items()},
                start={tp: int(d["offset"]) for tp, d in saved.items()},
                end={tp: int(d["end"]) for tp, d in saved.items()},
                resumed=True,
            )
    return Plan(first=first, start=dict(first), end=end, resumed=False)


def retention_problems(
    since: float,
    marks: Mapping[TopicPart, Marks],
    first_retained: Mapping[TopicPart, float],
) -> list[str]:
    """One line per partition whose data from ``since`` on is partly gone: offsets before its
    low watermark were deleted and its earliest retained message is younger than ``since``."""
    out = []
    for tp in sorted(marks):
        low = marks[tp].low
        ts = first_retained.get(tp)
        if low <= 0 or ts is None or ts <= since:
            continue
        out.append(
            f"{tp[0]}[{tp[1]}]: the earliest message Kafka still holds is from {iso(ts)} "
            f"({span(ts - since)} after --since), {low:,} earlier messages were deleted"
        )
    return out


# --- progress -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    done: int  # messages of the range written and committed
    total: int
    points: int  # points written by this run
    points_per_s: float
    messages_per_s: float
    eta: float | None  # seconds, None while unknown
    state: str  # "running", "retrying: <why>", "done", "interrupted"
    resumed: bool

    def json(self) -> dict[str, Any]:
        return {
            "event": "backfill_progress",
            "done": self.done,
            "total": self.total,
            "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
            "points": self.points,
            "points_per_s": round(self.points_per_s, 1),
            "eta_s": None if self.eta is None else round(self.eta, 1),
            "state": self.state,
            "resumed": self.resumed,
        }


class _Speed:
    """Per-second rates over the last 10 s of two growing totals."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: list[tuple[float, int, int]] = []

    def update(self, now: float, messages: int, points: int) -> tuple[float, float]:
        self._samples.append((now, messages, points))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.pop(0)
        t0, m0, p0 = self._samples[0]
        if now - t0 < 0.5:
            return 0.0, 0.0
        return (messages - m0) / (now - t0), (points - p0) / (now - t0)


# --- the run --------------------------------------------------------------------------------


class OffsetSource(Protocol):
    """What the backfill reads of Kafka besides messages (``router.kafka.KafkaAdmin``)."""

    def partitions(
        self, topics: Iterable[str], *, timeout: float | None = None
    ) -> list[TopicPart]: ...
    def watermarks(
        self, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, Marks]: ...
    def offsets_at(
        self, tps: Iterable[TopicPart], when: float, *, timeout: float | None = None
    ) -> dict[TopicPart, int]: ...
    def commits(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, tuple[int, str]]: ...
    def timestamps(
        self, wanted: Mapping[TopicPart, int], *, timeout: float | None = None
    ) -> dict[TopicPart, float]: ...


@dataclass(frozen=True)
class Job:
    route: str
    cluster: str
    group: str
    topics: tuple[str, ...]
    since: float
    until: float | None
    max_points: int
    max_bytes: int
    linger: float
    max_in_flight: int
    write_deadline: float
    graphite_templates: tuple[str, ...] = ()
    stamp_missing: bool = True
    precision: Precision = "ns"
    restart: bool = False
    patience: float = 300.0  # seconds of failed writes without a success before giving up


def prepare(admin: OffsetSource, job: Job) -> Plan:
    """Resolve the range; raises BackfillError when part of it left Kafka already."""
    tps = admin.partitions(job.topics)
    if not tps:
        raise BackfillError(f"route {job.route}: no partition of {', '.join(job.topics)} exists")
    marks = admin.watermarks(tps)
    lows = {tp: m.low for tp, m in marks.items() if m.low > 0}
    first_retained = admin.timestamps(lows) if lows else {}
    gone = retention_problems(job.since, marks, first_retained)
    if gone:
        oldest = max(first_retained[tp] for tp in lows if tp in first_retained)
        raise BackfillError(
            f"--since {iso(job.since)} is older than Kafka's retention: the data from then on "
            f"is partly gone\n  "
            + "\n  ".join(gone)
            + f"\nBackfill what is left with --since {iso(oldest)} (or later)."
        )
    since_offsets = admin.offsets_at(tps, job.since)
    if job.until is not None:
        end_offsets = admin.offsets_at(tps, job.until)
    else:
        end_offsets = {tp: m.high for tp, m in marks.items()}
    return plan_range(
        since=job.since,
        until=job.until,
        since_offsets=since_offsets,
        end_offsets=end_offsets,
        commits=admin.commits(job.group, tps),
        restart=job.restart,
    )


class Backfill:
    """One run of a ``Job`` with a planned range; ``run`` returns the last progress."""

    def __init__(
        self,
        job: Job,
        plan: Plan,
        *,
        kafka_config: Mapping[str, str],
        sink: Sink,
        dead_letters: DeadLetters,
        report: Callable[[Progress], None] = lambda p: None,
        report_every: float = 1.0,
    ) -> None:
        self.job = job
        self.plan = plan
        self._report = report
        self._report_every = report_every
        self._stop = threading.Event()
        self._consumer = Consumer(
            client_config(
                kafka_config,
                {
                    "group.id": job.group,
                    "client.id": f"frouter-backfill-{job.route}-{job.cluster}",
                    "enable.auto.commit": "false",
                    "enable.auto.offset.store": "false",
                    "auto.offset.reset": "error",  # a range deleted under us must surface
                    "queued.max.messages.kbytes": "16384",
                },
            )
        )
        self._pool = WritePool(
            route=job.route,
            cluster=job.cluster,
            sink=sink,
            dead_letters=dead_letters,
            workers=job.max_in_flight,
        )
        self._batcher = Batcher(job.max_points, job.max_bytes, job.linger)
        self._tracker = OffsetTracker()
        self._graphite = (
            GraphiteConverter(job.graphite_templates) if job.graphite_templates else None
        )
        self._position = dict(plan.start)  # committed: the next offset to write, per partition
        self._read_to = dict(plan.start)  # next offset to read, per partition
        self._unsettled: dict[int, Batch] = {}
        self._retry: dict[int, float] = {}  # batch id -> monotonic time to write it again
        self._failures = 0
        self._failing_since = 0.0
        self._state = "running"
        self._points = 0
        self._speed = _Speed()
        self._ends_checked = 0.0

    def stop(self) -> None:
        """Finish what is in flight, commit, return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> Progress:
        todo = {tp: o for tp, o in self.plan.start.items() if o < self.plan.end[tp]}
        log.info(
            "backfill_started",
            route=self.job.route,
            cluster=self.job.cluster,
            group=self.job.group,
            since=iso(self.job.since),
            until=iso(self.job.until) if self.job.until is not None else "end",
            total=self.plan.total,
            done=self.plan.done(self._position),
            resumed=self.plan.resumed,
        )
        try:
            if todo:
                self._consumer.assign([TopicPartition(t, p, o) for (t, p), o in todo.items()])
            self._loop(set(todo))
        except KafkaException as exc:
            raise SourceError(f"backfill: Kafka: {exc!r}") from exc
        finally:
            self._finish()
        done = self.plan.done(self._position)
        state = "done" if done >= self.plan.total else "interrupted"
        return self._progress(state)

    # --- the loop -----------------------------------------------------------------------

    def _loop(self, reading: set[TopicPart]) -> None:
        last_report = 0.0
        self._emit(self._progress("running"))
        while not self._stop.is_set():
            self._settle(self._pool.get(0.02 if self._unsettled else None))
            now = time.monotonic()
            for batch_id, when in list(self._retry.items()):
                if now >= when:
                    del self._retry[batch_id]
                    self._pool.submit(self._unsettled[batch_id])
            if reading and len(self._unsettled) < self.job.max_in_flight:
                self._read(reading)
            elif not reading:
                if self._batcher.current.empty() and not self._unsettled:
                    break  # everything read, written and committed
                if not self._batcher.current.empty():
                    self._submit(self._batcher.take())
            if self._batcher.due(time.monotonic()):
                self._submit(self._batcher.take())
            if now - last_report >= self._report_every:
                last_report = now
                self._emit(self._progress(self._state))

    def _read(self, reading: set[TopicPart]) -> None:
        msgs = self._consumer.consume(num_messages=self.job.max_points, timeout=0.05)
        if not msgs:
            self._check_ends(reading)
        for msg in msgs:
            err = msg.error()
            tp = (msg.topic() or "", msg.partition() or 0)
            if err is not None:
                if err.code() == KafkaError._AUTO_OFFSET_RESET:
                    raise BackfillError(
                        f"{tp[0]}[{tp[1]}]: offset {self._read_to.get(tp)} was deleted by "
                        "Kafka's retention while the backfill read it; rerun with a later --since"
                    )
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("backfill_consume_error", error=str(err))
                continue
            if tp not in reading:
                continue
            offset = msg.offset() or 0
            end = self.plan.end[tp]
            if offset >= end:
                self._done_reading(tp, reading)
                continue
            self._read_to[tp] = offset + 1
            self._add(tp, offset, msg)
            if offset + 1 >= end:
                self._done_reading(tp, reading)

    def _check_ends(self, reading: set[TopicPart]) -> None:
        """Nothing came: a partition whose last offsets are no messages (transaction markers,
        compacted away) is done once the consumer's position reached its end."""
        now = time.monotonic()
        if now - self._ends_checked < 1.0:
            return
        self._ends_checked = now
        positions = self._consumer.position([TopicPartition(t, p) for t, p in reading])
        for tp in positions:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0 and tp.offset >= self.plan.end[key]:
                self._done_reading(key, reading)

    def _done_reading(self, tp: TopicPart, reading: set[TopicPart]) -> None:
        if tp in reading:
            reading.discard(tp)
            self._consumer.pause([TopicPartition(tp[0], tp[1])])

    def _add(self, tp: TopicPart, offset: int, msg: Record) -> None:
        """The message as the live destination would write it (graphite conversion, missing
        timestamps from the message time), then batched."""
        value = msg.value()
        payload = bytes(value) if value else b""
        if payload and self._graphite is not None:
            ts = kafka_time(msg.timestamp(), "ns") if self.job.stamp_missing else None
            payload, bad = self._graphite.convert(payload, time.time_ns() if ts is None else ts)
            self._batcher.current.dead.extend(
                DeadLetter(line, why, tp[0], tp[1], offset, self.job.cluster, self.job.route)
                for line, why in bad
            )
        elif payload and self.job.stamp_missing and lacks_timestamp(payload):
            ts = kafka_time(msg.timestamp(), self.job.precision)
            if ts is not None:
                payload = stamp_lines(payload, ts)
        if not payload:
            self._batcher.current.advance(tp, offset)
            return
        for full in self._batcher.add(tp, offset, payload):
            self._submit(full)

    def _submit(self, batch: Batch) -> None:
        if batch.empty():
            return
        batch.submitted = time.monotonic()
        self._tracker.add(batch.batch_id, batch.last)
        self._unsettled[batch.batch_id] = batch
        self._pool.submit(batch)

    # --- outcomes -----------------------------------------------------------------------

    def _settle(self, outcomes: Sequence[Outcome]) -> None:
        ready: dict[TopicPart, int] = {}
        for outcome in outcomes:
            batch = outcome.batch
            if outcome.ok:
                self._unsettled.pop(batch.batch_id, None)
                self._points += batch.points - batch.refused
                self._failures = 0
                self._failing_since = 0.0
                self._state = "running"
                if batch.letters:
                    log.warning("dead_letters", lines=len(batch.letters), cluster=self.job.cluster)
                ready.update(self._tracker.complete(batch.batch_id))
                continue
            if outcome.kind == "misconfigured":
                raise BackfillError(
                    f"{self.job.cluster} refused the writes: {outcome.reason} (fix the cluster's "
                    "entry in the topology or its credentials, then rerun to resume)"
                )
            now = time.monotonic()
            self._failures += 1
            self._failing_since = self._failing_since or now
            if now - self._failing_since > self.job.patience:
                raise BackfillError(
                    f"writes to {self.job.cluster} failed for {span(now - self._failing_since)}: "
                    f"{outcome.reason} (rerun to resume)"
                )
            delay = backoff_delay(self._failures)
            self._retry[batch.batch_id] = now + delay
            self._state = f"retrying: {outcome.reason}"
            log.warning(
                "backfill_write_failed",
                cluster=self.job.cluster,
                kind=outcome.kind,
                reason=outcome.reason,
                retry_in=round(delay, 2),
            )
        if ready:
            self._commit(ready, asynchronous=True)

    def _commit(self, offsets: Mapping[TopicPart, int], *, asynchronous: bool) -> None:
        self._position.update(offsets)
        tps = [
            TopicPartition(
                t,
                p,
                o,
                metadata=range_meta(
                    self.job.since, self.job.until, self.plan.first[(t, p)], self.plan.end[(t, p)]
                ),
            )
            for (t, p), o in offsets.items()
        ]
        try:
            if asynchronous:
                self._consumer.commit(offsets=tps, asynchronous=True)
            else:
                self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            log.warning("backfill_commit_failed", error=str(exc))

    def _finish(self) -> None:
        """Let the writes in flight land (bounded by the write deadline), commit, close."""
        deadline = time.monotonic() + self.job.write_deadline
        try:
            while self._unsettled and time.monotonic() < deadline and not self._retry:
                self._settle(self._pool.get(0.1))
        except BackfillError:
            pass  # the first error is the one reported
        finally:
            if self._position != self.plan.start:
                self._commit(
                    {tp: o for tp, o in self._position.items() if o != self.plan.start[tp]},
                    asynchronous=False,
                )
            self._pool.close()
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("backfill_close_failed", error=str(exc))

    def _progress(self, state: str) -> Progress:
        done = self.plan.done(self._position)
        msg_rate, pt_rate = self._speed.update(time.monotonic(), done, self._points)
        left = self.plan.total - done
        eta = left / msg_rate if msg_rate > 0 else (0.0 if left <= 0 else None)
        return Progress(
            done=done,
            total=self.plan.total,
            points=self._points,
            points_per_s=pt_rate,
            messages_per_s=msg_rate,
            eta=eta,
            state=state,
            resumed=self.plan.resumed,
        )

    def _emit(self, progress: Progress) -> None:
        self._report(progress)

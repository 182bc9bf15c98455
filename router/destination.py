"""One destination: the consumer group of a (route, cluster) pair, its batches and its commits.

A ``Destination`` is a state machine driven by one thread (the consumer thread), which alone
touches its ``PartitionSource`` (consume, pause, start, commit). It owns three narrow parts:

  source   ``router.source``: where partitions and messages come from (rebalance callbacks)
  batcher  ``router.batch``: messages -> batches (splits a message larger than a batch)
  writers  ``router.writer``: batches -> InfluxDB + dead letters on worker threads; every
           outcome, even an unexpected exception, comes back on one queue
  tracker  ``router.offsets.OffsetTracker``: what may be committed, per partition

Commands from the engine (activate, deactivate, stop) arrive on a queue. Every state change goes
through ``_transition``, which logs one ``destination_state`` event and sets the metrics:

  starting  the thread runs; no command yet
  paused    not wanted (or its cluster is unusable): partitions paused, backlog stays in Kafka
  active    partitions started at their computed offsets; messages batched and written
  draining  a graceful deactivation: nothing new is read; in-flight batches finish and commit,
            then ``paused`` (bounded by the write deadline; the engine waits for it)
  backoff   a batch failed (InfluxDB unavailable, timeout, an internal error): paused until
            every batch in flight settled and a growing, jittered, capped delay passed, then
            rewound to the committed offsets and started again (or paused if no longer wanted)
  blocked   InfluxDB took the batch but its refused lines cannot be delivered to the
            dead-letter topic: reading goes on, the batch is held (nothing of its partitions is
            committed past it) and its letters alone are retried with back-off until delivered
  stopped   InfluxDB refused our credentials or database (401/403/404): paused until the
            engine activates it again, once a re-probe of the cluster was accepted (or the
            topology changes the cluster and the engine rebuilds the destination)
  crashed   the consumer thread ended on an error: the engine rebuilds the destination
  closed    stopped on request (SIGTERM, reload)

Rebalance callbacks are bounded (``REBALANCE_WAIT``): in-flight writes of revoked partitions
are awaited that long, committed if they landed, otherwise abandoned uncommitted (the new owner
reads them again: at-least-once). Memory is bounded by max_in_flight x batch size plus
librdkafka's fetch queue, never by the backlog.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, cast

import structlog

from router.backoff import backoff_delay
from router.batch import Batch, Batcher
from router.errors import SourceError
from router.graphite import GraphiteConverter
from router.guard import Guard
from router.kafka import DeadLetter
from router.metrics import Metrics
from router.offsets import (
    Hole,
    Marks,
    OffsetTracker,
    StartPlan,
    TopicPart,
    decode_holes,
    encode_holes,
    start_offsets,
)
from router.policy import StartFrom
from router.source import PartitionSource, Record
from router.stamp import Precision, kafka_time, lacks_timestamp, stamp_lines
from router.writer import DeadLetters, Outcome, Sink, WritePool

log = structlog.get_logger("router")

REBALANCE_WAIT = 5.0  # seconds a rebalance callback waits for in-flight writes
MAX_BLOCKED = 8  # batches held for their dead letters before reading stops too


class State(StrEnum):
    STARTING = "starting"
    PAUSED = "paused"
    ACTIVE = "active"
    DRAINING = "draining"
    BACKOFF = "backoff"
    BLOCKED = "blocked"
    STOPPED = "stopped"
    CRASHED = "crashed"
    CLOSED = "closed"


class OffsetReader(Protocol):
    """What a destination reads of Kafka besides its messages (``router.kafka.KafkaAdmin``)."""

    def committed(self, group: str, tps: Iterable[TopicPart]) -> dict[TopicPart, int]: ...
    def commits(self, group: str, tps: Iterable[TopicPart]) -> dict[TopicPart, tuple[int, str]]: ...
    def watermarks(self, tps: Iterable[TopicPart]) -> dict[TopicPart, Marks]: ...


READING = frozenset({State.ACTIVE, State.BLOCKED})


@dataclass(frozen=True)
class DestinationSpec:
    route: str
    cluster: str
    group: str
    topics: tuple[str, ...]
    peer_groups: tuple[str, ...]  # every group of the route (TAKEOVER takes the max of them)
    max_points: int
    max_bytes: int
    linger: float
    max_in_flight: int
    write_deadline: float  # how long one batch may take with its retries
    graphite_templates: tuple[str, ...] = ()  # set: messages are graphite, converted first
    stamp_missing: bool = False  # a line without a timestamp gets its message's timestamp
    precision: Precision = "ns"  # of the writes (graphite: always ns), for stamp_missing
    guard: Guard | None = None  # the route's block rules / cardinality limits (router.guard)


@dataclass(frozen=True)
class DestinationStatus:
    route: str
    cluster: str
    group: str
    state: str  # a State value
    assigned: tuple[TopicPart, ...]
    paused: tuple[TopicPart, ...]
    in_flight: int
    buffered: int
    error: str
    reason: str = ""  # why the destination is in its state (its last transition)
    since: float = 0.0  # wall-clock time of the last state transition
    oldest_unsettled: float = 0.0  # age in seconds of the oldest batch not yet settled (0: none)
    thread_alive: bool = True  # False once the consumer thread has ended
    write_deadline: float = 60.0  # a batch older than this means the destination is stuck
    points_written: int = 0  # lines InfluxDB accepted from this destination object
    # wall-clock time InfluxDB last accepted a batch holding messages of the partition
    last_write: Mapping[TopicPart, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Activate:
    start: StartFrom


@dataclass(frozen=True)
class _Deactivate:
    graceful: bool
    reason: str
    done: threading.Event


class Destination:
    def __init__(
        self,
        spec: DestinationSpec,
        *,
        source: PartitionSource,
        sink: Sink,
        admin: OffsetReader,
        dead_letters: DeadLetters,
        metrics: Metrics,
        on_misconfigured: Callable[[str, str], None] = lambda cluster, why: None,
    ) -> None:
        self.spec = spec
        self._admin = admin
        self._dlq = dead_letters
        self._metrics = metrics
        self._on_misconfigured = on_misconfigured
        self._labels = {"route": spec.route, "cluster": spec.cluster}
        self._source = source
        self._writers = WritePool(
            route=spec.route,
            cluster=spec.cluster,
            sink=sink,
            dead_letters=dead_letters,
            workers=spec.max_in_flight,
        )
        self._batcher = Batcher(spec.max_points, spec.max_bytes, spec.linger)
        self._graphite = (
            GraphiteConverter(spec.graphite_templates) if spec.graphite_templates else None
        )
        self._commands: queue.Queue[_Activate | _Deactivate] = queue.Queue()
        # --- owned by the consumer thread ---
        self._state = State.STARTING
        self._reason = "created"
        self._since = time.time()
        self._want_active = False
        self._start_mode = StartFrom.OWN
        self._assigned: set[TopicPart] = set()
        self._live: set[TopicPart] = set()  # assigned and started: messages accepted
        self._tracker = OffsetTracker()
        self._committable: dict[TopicPart, int] = {}  # newest offsets handed to commit()
        self._holes: dict[TopicPart, tuple[Hole, ...]] = {}  # ranges below the commit not held
        self._next: dict[TopicPart, int] = {}  # live partition -> next offset to read
        self._starved_since = 0.0  # no free write slot since (monotonic; 0: a slot is free)
        self._throttled = False  # live partitions paused while no slot frees up
        self._generation = 0  # bumped when tracking resets: outcomes of older batches ignored
        self._unsettled: dict[int, Batch] = {}  # batch id -> batch, in flight or held
        self._held: dict[int, float] = {}  # batch id -> when to retry its dead letters
        self._failures = 0  # consecutive failed outcomes (the back-off grows with them)
        self._retry_at = 0.0
        self._draining: _Deactivate | None = None
        self._drain_deadline = 0.0
        self._pending_done: list[threading.Event] = []
        self._error = ""
        self._restart_reason = ""
        self._points = 0  # lines written (the status page's points/s)
        self._last_write: dict[TopicPart, float] = {}
        # --- shared ---
        self.crashed = ""  # set when the consumer thread ended: the engine rebuilds it
        self._stop = threading.Event()
        self._graceful_stop = True
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dest-{spec.route}-{spec.cluster}", daemon=True
        )
        self._status = self._snapshot()
        self._metrics.sink_misconfigured.labels(**self._labels).set(0)  # a rebuild starts clean
        for state in State:
            self._metrics.destination_state.labels(**self._labels, state=state.value).set(
                1 if state is self._state else 0
            )

    # --- called from other threads ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def activate(self, start: StartFrom) -> None:
        self._commands.put(_Activate(start))

    def deactivate(self, graceful: bool, reason: str) -> threading.Event:
        """Pause the destination; graceful: flush and commit first. The event is set when done."""
        done = threading.Event()
        self._commands.put(_Deactivate(graceful, reason, done))
        return done

    def request_stop(self, graceful: bool = True) -> threading.Event:
        """Stop fetching, finish in-flight writes (graceful), commit, leave the group. The event
        is set once the consumer has left its group and the thread has ended."""
        self._graceful_stop = graceful
        self._stop.set()
        if not self._thread.is_alive() and not self._thread.ident:
            self._stopped.set()  # never started
        return self._stopped

    def stop(self, timeout: float = 60.0, graceful: bool = True) -> None:
        self.request_stop(graceful)
        if self._thread.ident:
            self._thread.join(timeout)

    @property
    def status(self) -> DestinationStatus:
        snap = self._status
        oldest = snap.oldest_unsettled
        return dataclasses.replace(
            snap,
            oldest_unsettled=time.monotonic() - oldest if oldest else 0.0,
            thread_alive=self._thread.is_alive() or not self._thread.ident,
        )

    # --- the state machine --------------------------------------------------------------

    def _transition(self, to: State, reason: str, **fields: object) -> None:
        """The one place a state changes: one event, the state metric, the status."""
        if to is self._state and reason == self._reason:
            return
        frm = self._state
        self._state, self._reason, self._since = to, reason, time.time()
        if to is not frm:
            m = self._metrics.destination_state
            m.labels(**self._labels, state=frm.value).set(0)
            m.labels(**self._labels, state=to.value).set(1)
            self._metrics.destination_active.labels(**self._labels).set(
                1 if to in READING or to is State.DRAINING else 0
            )
        level = log.warning if to in (State.BACKOFF, State.BLOCKED) else log.info
        if to in (State.STOPPED, State.CRASHED):
            level = log.error
        level(
            "destination_state",
            **self._labels,
            from_state=frm.value,
            to_state=to.value,
            reason=reason,
            **fields,
        )
        self._publish()

    def _publish(self) -> None:
        self._status = self._snapshot()
        self._metrics.assigned_partitions.labels(**self._labels).set(len(self._assigned))
        self._metrics.paused_partitions.labels(**self._labels).set(
            len(self._assigned) - len(self._live)
        )
        self._metrics.in_flight.labels(**self._labels).set(len(self._unsettled))

    # --- the consumer thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._source.open(self._on_assign, self._on_revoke, self._on_lost)
            last_status = 0.0
            while not self._stop.is_set() and not self._restart_reason:
                self._handle_commands()
                self._settle(self._writers.get(None))
                self._tick()
                if self._state in READING and self._has_slot():
                    self._unthrottle()
                    self._consume(timeout=0.05)
                elif self._state in READING:
                    self._starved()
                else:
                    self._consume(timeout=0.1)
                now = time.monotonic()
                if self._state in READING and self._batcher.due(now):
                    self._submit(self._batcher.take())
                if now - last_status > 0.25:
                    self._publish()
                    last_status = now
            self._shutdown()
            if self._restart_reason:
                self.crashed = self._restart_reason
                self._transition(State.CRASHED, self._restart_reason)
            else:
                self._transition(State.CLOSED, "stop requested")
        except Exception as exc:  # deliberate: a dead thread must be visible
            log.exception("destination_crashed", **self._labels, error=str(exc))
            self._error = f"crashed: {type(exc).__name__}: {exc}"
            self.crashed = self._error
            self._transition(State.CRASHED, self._error)
            self._source.close()  # leave the group so the partitions move at once
        finally:
            self._writers.close()
            for done in self._pending_done:
                done.set()
            if self._draining is not None:
                self._draining.done.set()
            self._stopped.set()

    def _has_slot(self) -> bool:
        in_flight = len(self._unsettled) - len(self._held)
        return in_flight < self.spec.max_in_flight and len(self._held) < MAX_BLOCKED

    def _starved(self) -> None:
        """Every write slot is taken: wait for an outcome. If none comes for a second (a slow
        or hung cluster), pause the live partitions and keep polling, so rebalance callbacks
        still run within seconds; ``_unthrottle`` seeks them back to where reading stopped."""
        now = time.monotonic()
        if not self._starved_since:
            self._starved_since = now
        self._settle(self._writers.get(0.05))
        if self._has_slot() or self._state not in READING:
            return
        if not self._throttled and now - self._starved_since > 1.0:
            self._source.pause(sorted(self._live))
            self._throttled = True
        if self._throttled:
            self._consume(timeout=0.0)  # messages are dropped; callbacks are served

    def _unthrottle(self) -> None:
        self._starved_since = 0.0
        if not self._throttled:
            return
        self._throttled = False
        try:
            self._source.start({tp: self._next[tp] for tp in sorted(self._live)})
        except SourceError as exc:
            self._enter_backoff(f"resume after a slow write: {exc}")

    def _consume(self, timeout: float) -> None:
        msgs = self._source.poll(1000, timeout)
        if self._source.out_of_range:
            tps, self._source.out_of_range = self._source.out_of_range, []
            self._out_of_range(tps)
        if self._throttled or not msgs:
            return  # throttled: read again from self._next when a write slot frees up
        if self._graphite is not None:
            self._consume_each(msgs)
        else:
            self._consume_fast(msgs)

    def _consume_fast(self, msgs: Sequence[Record]) -> None:
        """The hot path (line protocol passed through): the messages of one consume call as
        one run, with C-level list building (``map``/``zip``) and one check of the whole run
        instead of Python work per message. A run with anything unusual in it (a partition no
        longer live, an empty message, a line without a timestamp, a series the guard has not
        seen, a message larger than a batch) goes message by message instead."""
        kind = type(msgs[0])  # unbound accessors: no bound method per message
        values = list(map(kind.value, msgs))
        batcher = self._batcher
        if not all(values) or max(map(len, values)) > batcher.max_bytes:  # type: ignore[arg-type]
            self._consume_each(msgs)
            return
        runs = cast("list[bytes]", values)  # every value is non-empty bytes
        tps = cast(
            "list[TopicPart]",
            list(zip(map(kind.topic, msgs), map(kind.partition, msgs), strict=True)),
        )
        if not self._live.issuperset(tps):  # (also: no topic or partition is None)
            self._consume_each(msgs)
            return
        guard = self.spec.guard
        if guard is not None and not all(map(guard.known, runs)):  # lock-free: series let through
            self._consume_each(msgs)
            return
        joined = b"\n".join(runs)
        if self.spec.stamp_missing and lacks_timestamp(joined):
            self._consume_each(msgs)
            return
        offsets = cast("list[int]", list(map(kind.offset, msgs)))
        lasts = dict(zip(tps, offsets, strict=True))
        one_line_each = joined.count(b"\n") == len(runs) - 1
        for full in batcher.add_run(tps, offsets, runs, one_line_each=one_line_each, lasts=lasts):
            self._submit(full)
        nxt = self._next
        for tp, offset in lasts.items():
            nxt[tp] = offset + 1

    def _consume_each(self, msgs: Sequence[Record]) -> None:
        """Message by message: graphite conversion, timestamps to add, the guard's refusals,
        messages larger than a batch, partitions paused under a fetch."""
        nxt = self._next
        stamp, precision = self.spec.stamp_missing, self.spec.precision
        for msg in msgs:
            tp = (msg.topic() or "", msg.partition() or 0)
            if tp not in self._live:
                continue  # fetched before a pause; it is read again after the next start
            offset = msg.offset() or 0
            nxt[tp] = offset + 1
            value = msg.value()
            payload = bytes(value) if value else b""
            if payload and self._graphite is not None:
                payload = self._from_graphite(tp, offset, payload, msg)
            elif payload and stamp and lacks_timestamp(payload):
                ts = kafka_time(msg.timestamp(), precision)
                if ts is not None:  # a message without a timestamp: InfluxDB's arrival time
                    payload = stamp_lines(payload, ts)
            if payload and self.spec.guard is not None:
                payload = self._guarded(tp, offset, payload)
            if not payload:
                self._batcher.current.advance(tp, offset)  # nothing to write: still commits
                continue
            for full in self._batcher.add(tp, offset, payload):
                self._submit(full)

    def _from_graphite(self, tp: TopicPart, offset: int, payload: bytes, msg: Record) -> bytes:
        """Graphite plaintext -> line protocol; bad lines ride along to the dead letters. A line
        without a timestamp gets the message's (``stamp_missing``), else the time now."""
        assert self._graphite is not None
        ts = kafka_time(msg.timestamp(), "ns") if self.spec.stamp_missing else None
        lines, bad = self._graphite.convert(payload, time.time_ns() if ts is None else ts)
        if bad:
            self._batcher.current.dead.extend(
                DeadLetter(line, reason, tp[0], tp[1], offset, self.spec.cluster, self.spec.route)
                for line, reason in bad
            )
        return lines

    def _guarded(self, tp: TopicPart, offset: int, payload: bytes) -> bytes:
        """The lines the route's guard lets through; refused ones ride along to the dead
        letters (reason ``blocked:<rule>`` or ``cardinality:<measurement>``)."""
        assert self.spec.guard is not None
        kept, refused = self.spec.guard.check(payload)
        if refused:
            self._batcher.current.dead.extend(
                DeadLetter(line, reason, tp[0], tp[1], offset, self.spec.cluster, self.spec.route)
                for line, reason in refused
            )
        return kept

    def _out_of_range(self, tps: list[TopicPart]) -> None:
        """A partition's next offset was deleted (retention) while we were reading it.

        librdkafka leaves the partition in an error state (auto.offset.reset=error) that a seek
        cannot leave, and re-assigning outside a rebalance is unsafe. So the destination stops
        gracefully (flush, commit, leave the group) and the engine rebuilds it: the new
        consumer starts from the committed offsets, and ``start_offsets`` counts the exact gap.
        """
        live = [tp for tp in tps if tp in self._live]
        if not live:
            return  # paused: it gets an explicit start offset when it is activated
        for t, p in live:
            log.warning("offset_out_of_range", **self._labels, topic=t, partition=p)
        t, p = live[0]
        self._restart_reason = f"offset out of range on {t}[{p}]"

    # --- writes and their outcomes ------------------------------------------------------

    def _submit(self, batch: Batch) -> None:
        if batch.empty():
            return
        batch.generation = self._generation
        batch.submitted = time.monotonic()
        self._tracker.add(batch.batch_id, batch.last)
        self._unsettled[batch.batch_id] = batch
        self._writers.submit(batch)

    def _settle(self, outcomes: Sequence[Outcome]) -> None:
        ready: dict[TopicPart, int] = {}
        for outcome in outcomes:
            batch = outcome.batch
            if batch.generation != self._generation:
                continue  # abandoned (revoked, rewound): its partitions are read again
            self._metrics.write_seconds.labels(**self._labels).observe(outcome.seconds)
            if outcome.ok:
                ready.update(self._succeeded(batch, outcome))
            elif outcome.kind == "dead_letter":
                self._letters_failed(batch, outcome)
            else:
                self._failed(batch, outcome)
        if ready:
            self._commit(ready, asynchronous=True)
        if outcomes:
            self._publish()

    def _succeeded(self, batch: Batch, outcome: Outcome) -> dict[TopicPart, int]:
        self._unsettled.pop(batch.batch_id, None)
        self._held.pop(batch.batch_id, None)
        self._failures = 0
        self._metrics.batches.labels(**self._labels, outcome="ok").inc()
        self._metrics.points_written.labels(**self._labels).inc(batch.points - batch.refused)
        self._points += batch.points - batch.refused
        now = time.time()
        for tp in batch.last:
            self._last_write[tp] = now
        self._metrics.messages_written.labels(**self._labels).inc(batch.messages)
        if batch.letters:
            for dl in batch.letters:
                self._metrics.dead_letters.labels(**self._labels, topic=dl.topic).inc()
            log.warning(
                "dead_letters", **self._labels, lines=len(batch.letters), topic=self._dlq.topic
            )
        if self._state is State.BLOCKED and not self._held:
            self._transition(State.ACTIVE, "dead letters delivered")
        return self._tracker.complete(batch.batch_id)

    def _letters_failed(self, batch: Batch, outcome: Outcome) -> None:
        """InfluxDB took the batch, the dead-letter topic did not take its refused lines."""
        self._failures += 1
        delay = backoff_delay(self._failures)
        self._held[batch.batch_id] = time.monotonic() + delay
        if self._state not in READING and self._state is not State.DRAINING:
            self._drop_held()
        self._metrics.dead_letter_errors.labels(**self._labels).inc()
        self._metrics.batch_failures.labels(**self._labels, reason="dead_letter").inc()
        self._metrics.batches.labels(**self._labels, outcome="dead_letter_error").inc()
        log.error(
            "dead_letter_failed",
            **self._labels,
            reason=outcome.reason,
            letters=len(batch.letters),
            retry_in=round(delay, 2),
        )
        if self._state is State.ACTIVE:
            self._transition(State.BLOCKED, f"dead letters undeliverable: {outcome.reason}")

    def _failed(self, batch: Batch, outcome: Outcome) -> None:
        kind = outcome.kind or "internal"
        self._unsettled.pop(batch.batch_id, None)
        self._tracker.fail(batch.batch_id)
        self._metrics.batch_failures.labels(**self._labels, reason=kind).inc()
        self._metrics.batches.labels(
            **self._labels, outcome="misconfigured" if kind == "misconfigured" else "failed"
        ).inc()
        log.warning(
            "batch_failed",
            **self._labels,
            reason=outcome.reason,
            kind=kind,
            messages=batch.messages,
        )
        if kind == "misconfigured":
            if self._state is not State.STOPPED:
                self._error = outcome.reason
                self._metrics.sink_misconfigured.labels(**self._labels).set(1)
                log.error("sink_misconfigured", **self._labels, reason=outcome.reason)
                self._on_misconfigured(self.spec.cluster, outcome.reason)
                self._halt()
                self._transition(State.STOPPED, outcome.reason)
            return
        self._failures += 1
        if self._state is not State.BACKOFF and self._state is not State.STOPPED:
            delay = backoff_delay(self._failures)
            self._retry_at = time.monotonic() + delay
            self._halt()
            self._transition(State.BACKOFF, outcome.reason, retry_in=round(delay, 2))

    def _halt(self) -> None:
        """Stop reading: pause every partition, drop what is buffered, end a drain."""
        self._pause_all()
        self._batcher.drop()
        self._drop_held()
        if self._draining is not None:
            self._pending_done.append(self._draining.done)
            self._draining = None

    def _drop_held(self) -> None:
        """Give up the batches held for their letters (not while a retry is in flight): they
        stay uncommitted, so their range is read, written and dead-lettered again later."""
        for batch_id, when in list(self._held.items()):
            if when != float("inf"):
                del self._held[batch_id]
                self._unsettled.pop(batch_id, None)
                self._tracker.fail(batch_id)

    def _tick(self) -> None:
        """Time-driven transitions: retry held letters, end a back-off, finish a drain."""
        now = time.monotonic()
        for batch_id, when in list(self._held.items()):
            if now >= when:
                self._held[batch_id] = float("inf")  # in flight again
                self._writers.submit(self._unsettled[batch_id])
        for done in self._pending_done:
            done.set()
        self._pending_done.clear()
        if self._state is State.BACKOFF and not self._unsettled and now >= self._retry_at:
            self._reset_tracking()
            if self._want_active:
                self._resume("retry after back-off")
            else:
                self._transition(State.PAUSED, "back-off over; not wanted")
        elif (
            self._state is State.DRAINING
            and self._draining is not None
            and (not self._unsettled or now >= self._drain_deadline)
        ):
            cmd = self._draining
            self._draining = None
            self._commit_sync()
            if self._unsettled:
                log.warning("drain_incomplete", **self._labels, batches=len(self._unsettled))
            self._transition(State.PAUSED, cmd.reason, graceful=True)
            cmd.done.set()
            if self._want_active:  # activated again while draining
                self._resume(f"start from {self._start_mode.value}")

    def _reset_tracking(self) -> None:
        """Forget every batch in flight or buffered: revoke, lost, back-off all start over from
        the committed offsets (outcomes still to come are ignored by their generation)."""
        self._generation += 1
        self._tracker = OffsetTracker()
        self._unsettled.clear()
        self._held.clear()
        self._batcher.drop()
        self._committable = {}
        self._next = {}
        self._throttled = False
        self._starved_since = 0.0

    # --- commands -----------------------------------------------------------------------

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Activate):
                self._start_mode = cmd.start
                self._want_active = True
                if self._state is State.STOPPED:  # its cluster accepts our writes again
                    self._error = ""
                    self._metrics.sink_misconfigured.labels(**self._labels).set(0)
                    self._resume(f"cluster accepts writes again; start from {cmd.start.value}")
                elif self._state in (State.STARTING, State.PAUSED):
                    self._resume(f"start from {cmd.start.value}")
            else:
                self._deactivate(cmd)

    def _deactivate(self, cmd: _Deactivate) -> None:
        self._want_active = False
        if self._state not in READING:
            if self._state is State.STARTING:
                self._transition(State.PAUSED, cmd.reason)
            cmd.done.set()
            return
        self._pause_all()
        if not cmd.graceful:
            self._batcher.drop()
            self._drop_held()
            self._transition(State.PAUSED, cmd.reason, graceful=False)
            cmd.done.set()
            return
        self._submit(self._batcher.take())
        self._draining = cmd
        self._drain_deadline = time.monotonic() + self.spec.write_deadline
        self._transition(State.DRAINING, cmd.reason)

    # --- offsets ------------------------------------------------------------------------

    def _commit(self, offsets: Mapping[TopicPart, int], asynchronous: bool) -> None:
        mine = {tp: o for tp, o in offsets.items() if tp in self._assigned}
        self._committable.update(mine)
        holes = self._holes
        meta = {tp: encode_holes(holes[tp]) for tp in mine if tp in holes}
        try:
            self._source.commit(mine, asynchronous, meta)
        except SourceError as exc:
            log.warning("commit_failed", **self._labels, error=str(exc))

    def _commit_sync(self) -> None:
        """Commit synchronously the newest committable offsets (async commits may be queued)."""
        if self._committable:
            self._commit(dict(self._committable), asynchronous=False)

    def _plan(self, tps: Sequence[TopicPart], mode: StartFrom) -> StartPlan:
        """Read the commits and watermarks, then decide (``start_offsets``) and record."""
        mine = self._admin.commits(self.spec.group, tps)
        own = {tp: o for tp, (o, _) in mine.items()}
        holes = {tp: decode_holes(m) for tp, (_, m) in mine.items()}
        peers = [
            self._admin.committed(g, tps)
            for g in self.spec.peer_groups
            if g != self.spec.group and mode is not StartFrom.OWN
        ]
        plan = start_offsets(mode.value, own, peers, self._admin.watermarks(tps), holes)
        self._holes.update({tp: h for tp, h in plan.holes.items() if h})
        for tp, h in plan.holes.items():
            if not h:
                self._holes.pop(tp, None)
        for (t, p), (first, nxt, lost) in plan.gaps.items():
            self._metrics.retention_lost.labels(**self._labels, topic=t).inc(lost)
            log.error(
                "retention_gap",
                **self._labels,
                topic=t,
                partition=p,
                committed=first,
                earliest=nxt,
                lost=lost,
            )
        for (t, p), (first, nxt) in plan.skips.items():
            self._metrics.skipped.labels(**self._labels, topic=t).inc(nxt - first)
            log.warning(
                "skipped_range",
                **self._labels,
                topic=t,
                partition=p,
                first=first,
                next=nxt,
                count=nxt - first,
            )
        if plan.record:  # a skip or a retention gap is recorded as this group's progress
            self._commit(plan.record, asynchronous=False)
        if mode is StartFrom.SKIP:
            self._start_mode = StartFrom.OWN  # skipped once; later rewinds use our commits
        return plan

    def _resume(self, reason: str) -> None:
        """Start every assigned partition from its computed offset; whatever was in flight
        from before is forgotten (it is read again if it did not commit)."""
        self._reset_tracking()
        tps = sorted(self._assigned)
        if tps:
            try:
                plan = self._plan(tps, self._start_mode)
                self._source.start(plan.starts)
            except SourceError as exc:
                # e.g. a seek before the partition's fetcher has its first offset: retry
                self._enter_backoff(f"start offsets: {exc}")
                return
            self._live = set(tps)
            self._next = dict(plan.starts)
            self._throttled = False
            starts = {f"{t}[{p}]": o for (t, p), o in plan.starts.items()}
            self._transition(State.ACTIVE, reason, starts=starts)
        else:
            self._transition(State.ACTIVE, f"{reason}; no partition assigned yet")

    def _enter_backoff(self, reason: str) -> None:
        self._failures += 1
        delay = backoff_delay(self._failures)
        self._retry_at = time.monotonic() + delay
        self._halt()
        self._transition(State.BACKOFF, reason, retry_in=round(delay, 2))

    def _pause_all(self) -> None:
        try:
            self._source.pause(sorted(self._assigned))
        except SourceError as exc:
            log.warning("pause_failed", **self._labels, error=str(exc))
        self._live = set()
        self._throttled = False

    # --- rebalance callbacks (run inside poll(), on the consumer thread) ------------------

    def _on_assign(self, tps: list[TopicPart]) -> Mapping[TopicPart, int]:
        """Partitions added to this destination (all of them after an eager rebalance, some
        when the route's membership grants more). Returns where the new ones start; an
        active destination starts them at once (TAKEOVER offsets for a standby, its own
        commits for a primary), an inactive one keeps them paused."""
        new = [tp for tp in tps if tp not in self._assigned]
        self._assigned.update(new)
        starts: dict[TopicPart, int] = {}
        if new and self._want_active and self._state in (*READING, State.PAUSED, State.STARTING):
            try:
                if self._state in READING:
                    starts = self._plan(new, self._start_mode).starts
                else:  # wanted but idle (a drain ended by a rebalance): start everything
                    self._reset_tracking()
                    plan = self._plan(sorted(self._assigned), self._start_mode).starts
                    self._source.start({tp: o for tp, o in plan.items() if tp not in new})
                    starts = {tp: o for tp, o in plan.items() if tp in new}
                    self._live = set(plan) - set(new)
                    self._next = {tp: o for tp, o in plan.items() if tp not in new}
                    self._transition(State.ACTIVE, "partitions assigned while wanted")
            except SourceError as exc:
                log.warning("start_offsets_failed", **self._labels, error=str(exc))
                self._enter_backoff(f"start offsets: {exc}")
                starts = {}
        self._live.update(starts)
        self._next.update(starts)
        log.info(
            "partitions_assigned",
            **self._labels,
            added=len(new),
            partitions=len(self._assigned),
            started=len(starts),
        )
        self._publish()
        return starts

    def _on_revoke(self, tps: list[TopicPart]) -> None:
        """Bounded: wait up to REBALANCE_WAIT for the in-flight writes of the revoked
        partitions, commit what landed, abandon the rest uncommitted (the new owner reads it
        again). Partitions this destination keeps go on; if an abandoned batch also held some
        of theirs, they restart from their commits."""
        revoked = set(tps) & self._assigned
        if self._state in READING:
            self._submit(self._batcher.take())  # it may hold messages of partitions we keep
        else:
            self._batcher.drop()

        def pending() -> list[Batch]:
            return [b for b in self._unsettled.values() if revoked & set(b.last)]

        deadline = time.monotonic() + min(REBALANCE_WAIT, self.spec.write_deadline)
        while pending() and time.monotonic() < deadline and self._state is not State.BACKOFF:
            self._settle(self._writers.get(0.05))
            if all(b.batch_id in self._held for b in pending()):
                break  # held for their dead letters: they will not land in time
        self._commit_sync()
        abandoned = pending()
        if abandoned:
            log.warning("revoke_abandoned", **self._labels, batches=len(abandoned))
        self._release(revoked, restart=bool(abandoned))

    def _on_lost(self, tps: list[TopicPart]) -> None:
        """Partitions taken away without a revoke (session timeout): nothing is committed."""
        self._release(set(tps) & self._assigned, restart=True)

    def _release(self, gone: set[TopicPart], *, restart: bool) -> None:
        """Forget ``gone``. With ``restart`` every batch in flight is abandoned and the
        partitions kept restart from their commits (a batch may span several partitions)."""
        kept = sorted(self._live - gone)
        self._assigned -= gone
        self._live -= gone
        for tp in gone:
            self._next.pop(tp, None)
            self._committable.pop(tp, None)
            self._holes.pop(tp, None)
        if restart or not self._assigned:
            self._reset_tracking()
            if kept and self._state in READING:
                self._restart(kept)
        else:
            self._tracker.drop(gone)
        if self._draining is not None and not self._assigned:  # nothing left to drain here
            cmd, self._draining = self._draining, None
            self._transition(State.PAUSED, cmd.reason, graceful=True)
            cmd.done.set()
        self._publish()

    def _restart(self, tps: list[TopicPart]) -> None:
        """Start ``tps`` (already assigned) again from their computed offsets."""
        try:
            starts = self._plan(tps, self._start_mode).starts
            self._source.start(starts)
        except SourceError as exc:
            self._enter_backoff(f"restart after a rebalance: {exc}")
            return
        self._live.update(starts)
        self._next.update(starts)

    # --- end ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._pause_all()
        if self._graceful_stop and self._state in (*READING, State.DRAINING):
            self._submit(self._batcher.take())
            deadline = time.monotonic() + self.spec.write_deadline
            while self._unsettled and time.monotonic() < deadline:
                self._settle(self._writers.get(0.1))
                if self._state is State.BACKOFF or (
                    self._held and len(self._held) == len(self._unsettled)
                ):
                    break  # nothing more will land: leave it uncommitted
            self._commit_sync()
        self._source.close()

    def _snapshot(self) -> DestinationStatus:
        # batches waiting for an answer; one held for its dead letters has had it (and is
        # shown as state ``blocked``: restarting the process would not deliver its letters)
        held = self._held
        oldest = min(
            (b.submitted for i, b in self._unsettled.items() if i not in held), default=0.0
        )
        return DestinationStatus(
            route=self.spec.route,
            cluster=self.spec.cluster,
            group=self.spec.group,
            state=self._state.value,
            assigned=tuple(sorted(self._assigned)),
            paused=tuple(sorted(self._assigned - self._live)),
            in_flight=len(self._unsettled),
            buffered=len(self._batcher.current.values),
            error=self._error or (self._reason if self._state is State.BLOCKED else ""),
            reason=self._reason,
            since=self._since,
            oldest_unsettled=oldest,  # monotonic; ``status`` turns it into an age
            write_deadline=self.spec.write_deadline,
            points_written=self._points,
            last_write=dict(self._last_write),
        )

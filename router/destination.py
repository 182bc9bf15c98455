"""One destination: the consumer group of a (route, cluster) pair, its batches and its commits.

A ``Destination`` owns one confluent-kafka consumer and one thread that does every consumer
call (consume, pause, seek, resume, commit). Writes run on a small thread pool (``max_in_flight``
batches at once); their outcomes come back to the consumer thread through a queue, where the
``OffsetTracker`` decides what may be committed. Commands from the engine (activate,
deactivate) also go through a queue, so the consumer is never touched from two threads.

States of the destination (``want_active`` is what the engine asked for):
  active   partitions resumed at a computed start offset, messages batched and written
  paused   partitions paused; the backlog stays in Kafka; a stale message is dropped
  cooldown a batch failed: paused until every in-flight batch is settled, then (if still
           wanted) rewound to the committed offsets and resumed after a back-off
  stopped  InfluxDB refused our credentials/database: paused until the topology changes

Memory is bounded by max_in_flight x batch size plus librdkafka's fetch queue (capped in the
consumer settings), never by the backlog.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from router.errors import SinkError, SinkMisconfigured, SourceError
from router.graphite import GraphiteConverter
from router.kafka import NO_OFFSET, DeadLetter, DeadLetterProducer, KafkaAdmin
from router.metrics import Metrics
from router.offsets import OffsetTracker, TopicPart
from router.policy import StartFrom
from router.sink import InfluxSink

log = structlog.get_logger("router")


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
    write_deadline: float  # how long one batch may take with its retries (revoke/drain wait)
    graphite_templates: tuple[str, ...] = ()  # set: messages are graphite, converted first


@dataclass
class _Batch:
    batch_id: int
    values: list[bytes] = field(default_factory=list)
    origins: list[TopicPart] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    last: dict[TopicPart, int] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)  # refused before the write
    points: int = 0
    size: int = 0
    started: float = 0.0

    def add(self, tp: TopicPart, offset: int, value: bytes) -> None:
        if not self.values:
            self.started = time.monotonic()
        self.values.append(value)
        self.origins.append(tp)
        self.offsets.append(offset)
        self.last[tp] = offset
        self.points += value.count(b"\n") + (0 if value.endswith(b"\n") else 1)
        self.size += len(value) + 1


@dataclass(frozen=True)
class _Outcome:
    batch: _Batch
    error: SinkError | SourceError | None = None
    rejected: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Activate:
    start: StartFrom


@dataclass(frozen=True)
class _Deactivate:
    graceful: bool
    reason: str
    done: threading.Event


@dataclass(frozen=True)
class DestinationStatus:
    route: str
    cluster: str
    group: str
    state: str  # active | paused | cooldown | stopped
    assigned: tuple[TopicPart, ...]
    paused: tuple[TopicPart, ...]
    in_flight: int
    buffered: int
    error: str


class Destination:
    def __init__(
        self,
        spec: DestinationSpec,
        *,
        kafka_config: Mapping[str, str],
        sink: InfluxSink,
        admin: KafkaAdmin,
        dead_letters: DeadLetterProducer,
        metrics: Metrics,
        on_misconfigured: Callable[[str, str], None] = lambda cluster, why: None,
    ) -> None:
        self.spec = spec
        self._sink = sink
        self._admin = admin
        self._dlq = dead_letters
        self._metrics = metrics
        self._on_misconfigured = on_misconfigured
        try:
            self._consumer = self._make_consumer(spec, kafka_config)
        except KafkaException as exc:
            raise SourceError(f"cannot create the consumer of {spec.group}: {exc}") from exc
        self._pool = ThreadPoolExecutor(
            max_workers=spec.max_in_flight, thread_name_prefix=f"write-{spec.cluster}"
        )
        self._commands: queue.Queue[_Activate | _Deactivate] = queue.Queue()
        self._outcomes: queue.Queue[_Outcome] = queue.Queue()
        self._tracker = OffsetTracker()
        self._committable: dict[TopicPart, int] = {}  # newest offsets handed to commit()
        self.crashed = ""  # set when the consumer thread ended: the engine rebuilds it
        self._restart_reason = ""
        self._assigned: set[TopicPart] = set()
        self._live: set[TopicPart] = set()  # assigned, sought and resumed: messages accepted
        self._want_active = False
        self._start_mode = StartFrom.OWN
        self._cooldown_until: float | None = None
        self._stopped_reason = ""
        self._batch = _Batch(0)
        self._next_batch = 1
        self._stop = threading.Event()
        self._graceful_stop = True
        self._thread = threading.Thread(
            target=self._run, name=f"dest-{spec.route}-{spec.cluster}", daemon=True
        )
        self._status = self._snapshot()
        self._labels = {"route": spec.route, "cluster": spec.cluster}
        self._graphite = (
            GraphiteConverter(spec.graphite_templates) if spec.graphite_templates else None
        )

    @staticmethod
    def _make_consumer(spec: DestinationSpec, kafka_config: Mapping[str, str]) -> Consumer:
        return Consumer(
            {
                # defaults an operator may override in kafka.client_config
                "session.timeout.ms": "10000",  # a dead replica's partitions move in ~10 s
                "heartbeat.interval.ms": "1000",
                "queued.max.messages.kbytes": "16384",  # bounds librdkafka's prefetch
                "client.id": f"frouter-{spec.route}-{spec.cluster}",
                **kafka_config,
                # owned by the router (the topology refuses them in client_config)
                "group.id": spec.group,
                "enable.auto.commit": "false",
                "enable.auto.offset.store": "false",
                # Start offsets are always explicit; data deleted under a partition being read
                # must surface (and be counted), not be skipped silently by librdkafka.
                "auto.offset.reset": "error",
                "partition.assignment.strategy": "range,roundrobin",
            }
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

    def stop(self, timeout: float = 60.0, graceful: bool = True) -> None:
        """Stop fetching, finish in-flight writes, commit, leave the group."""
        self._graceful_stop = graceful
        self._stop.set()
        self._thread.join(timeout)

    @property
    def status(self) -> DestinationStatus:
        return self._status

    # --- the consumer thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._consumer.subscribe(
                list(self.spec.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            last_status = 0.0
            while not self._stop.is_set() and not self._restart_reason:
                self._handle_commands()
                self._settle_outcomes(block=False)
                self._maybe_recover()
                if self._live and self._tracker.in_flight() < self.spec.max_in_flight:
                    self._consume(timeout=0.05)
                elif self._live:
                    self._settle_outcomes(block=True, timeout=0.05)
                else:
                    self._consume(timeout=0.1)  # paused: keeps group membership and callbacks
                self._maybe_flush()
                now = time.monotonic()
                if now - last_status > 0.25:
                    self._status = self._snapshot()
                    last_status = now
            self._shutdown()
            if self._restart_reason:
                self.crashed = self._restart_reason
        except (KafkaException, SourceError) as exc:  # the loop cannot go on: say so, loudly
            log.error("destination_crashed", **self._labels, error=str(exc))
            self._stopped_reason = f"crashed: {exc}"
            self._status = self._snapshot()
            self.crashed = str(exc)  # the engine rebuilds this destination
            with contextlib.suppress(KafkaException, RuntimeError):
                self._consumer.close()  # leave the group so the partitions move at once
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _consume(self, timeout: float) -> None:
        msgs = self._consumer.consume(num_messages=1000, timeout=timeout)
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._AUTO_OFFSET_RESET:
                    self._out_of_range((msg.topic() or "", msg.partition() or 0))
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume_error", **self._labels, error=str(err))
                continue
            tp = (msg.topic() or "", msg.partition() or 0)
            if tp not in self._live:
                continue  # fetched before a pause; it is read again after the next seek
            value = msg.value()
            if not value:
                continue
            offset = msg.offset() or 0
            payload = bytes(value)
            if self._graphite is not None:
                payload = self._from_graphite(tp, offset, payload)
                if not payload:
                    continue
            self._batch.add(tp, offset, payload)
            if self._batch_full():
                self._submit()

    def _from_graphite(self, tp: TopicPart, offset: int, payload: bytes) -> bytes:
        """Graphite plaintext -> line protocol; bad lines ride along to the dead letters."""
        assert self._graphite is not None
        lines, bad = self._graphite.convert(payload, time.time_ns())
        if bad:
            if not self._batch.values:
                self._batch.started = time.monotonic()
            self._batch.dead.extend(
                DeadLetter(line, reason, tp[0], tp[1], offset, self.spec.cluster, self.spec.route)
                for line, reason in bad
            )
            self._batch.last[tp] = max(self._batch.last.get(tp, offset), offset)
        return lines

    def _out_of_range(self, tp: TopicPart) -> None:
        """The partition's next offset was deleted (retention) while we were reading it.

        librdkafka leaves the partition in an error state (auto.offset.reset=error) that a seek
        cannot leave, and re-assigning outside a rebalance is unsafe. So the destination stops
        gracefully (flush, commit, leave the group) and the engine rebuilds it: the new
        consumer starts from the committed offsets, and ``_start_offsets`` counts the exact gap.
        """
        if tp not in self._live:
            return  # paused: it gets an explicit start offset when it is activated
        log.warning("offset_out_of_range", **self._labels, topic=tp[0], partition=tp[1])
        self._restart_reason = f"offset out of range on {tp[0]}[{tp[1]}]"

    def _record_retention_gap(self, tp: TopicPart, committed: int, earliest: int) -> None:
        lost = earliest - committed
        self._metrics.retention_lost.labels(**self._labels, topic=tp[0]).inc(lost)
        log.error(
            "retention_gap",
            **self._labels,
            topic=tp[0],
            partition=tp[1],
            committed=committed,
            earliest=earliest,
            lost=lost,
        )

    def _batch_full(self) -> bool:
        b = self._batch
        return b.points >= self.spec.max_points or b.size >= self.spec.max_bytes

    def _maybe_flush(self) -> None:
        b = self._batch
        if (b.values or b.dead) and time.monotonic() - b.started >= self.spec.linger:
            self._submit()

    def _submit(self) -> None:
        batch = self._batch
        self._batch = _Batch(self._next_batch + 1)
        if not batch.values and not batch.dead:
            return
        batch.batch_id = self._next_batch
        self._next_batch += 1
        self._tracker.add(batch.batch_id, batch.last)
        self._metrics.in_flight.labels(**self._labels).set(self._tracker.in_flight())
        future = self._pool.submit(self._write, batch)
        future.add_done_callback(self._collect)

    def _collect(self, future: Future[_Outcome]) -> None:
        if not future.cancelled():
            self._outcomes.put(future.result())

    def _write(self, batch: _Batch) -> _Outcome:
        """Runs on a pool thread: write, dead-letter the rejected lines, report the outcome."""
        started = time.monotonic()
        try:
            rejected = self._sink.write(batch.values) if batch.values else []
            letters = batch.dead + [
                DeadLetter(
                    line=r.line,
                    reason=r.reason,
                    topic=batch.origins[r.index][0],
                    partition=batch.origins[r.index][1],
                    offset=batch.offsets[r.index],
                    cluster=self.spec.cluster,
                    route=self.spec.route,
                )
                for r in rejected
            ]
            if letters:
                self._dlq.send(letters)
                for dl in letters:
                    self._metrics.dead_letters.labels(**self._labels, topic=dl.topic).inc()
        except (SinkError, SourceError) as exc:
            return _Outcome(batch, error=exc, seconds=time.monotonic() - started)
        return _Outcome(batch, rejected=len(letters), seconds=time.monotonic() - started)

    def _settle_outcomes(self, block: bool, timeout: float = 0.0) -> None:
        try:
            outcome = self._outcomes.get(timeout=timeout) if block else self._outcomes.get_nowait()
        except queue.Empty:
            return
        ready: dict[TopicPart, int] = {}
        while True:
            ready.update(self._settle(outcome))
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                break
        if ready:
            self._commit(ready, asynchronous=True)
        self._metrics.in_flight.labels(**self._labels).set(self._tracker.in_flight())

    def _settle(self, outcome: _Outcome) -> dict[TopicPart, int]:
        batch = outcome.batch
        labels = self._labels
        self._metrics.write_seconds.labels(**labels).observe(outcome.seconds)
        if outcome.error is None:
            self._metrics.batches.labels(**labels, outcome="ok").inc()
            written = batch.points - outcome.rejected + len(batch.dead)
            self._metrics.points_written.labels(**labels).inc(written)
            self._metrics.messages_written.labels(**labels).inc(len(batch.values))
            if outcome.rejected:
                log.warning("dead_letters", **labels, lines=outcome.rejected, topic=self._dlq.topic)
            return self._tracker.complete(batch.batch_id)
        self._tracker.fail(batch.batch_id)
        if isinstance(outcome.error, SinkMisconfigured):
            self._metrics.batches.labels(**labels, outcome="misconfigured").inc()
            if not self._stopped_reason:
                self._stopped_reason = str(outcome.error)
                self._metrics.sink_misconfigured.labels(**labels).set(1)
                log.error("sink_misconfigured", **labels, reason=str(outcome.error))
                self._on_misconfigured(self.spec.cluster, str(outcome.error))
        else:
            self._metrics.batches.labels(**labels, outcome="failed").inc()
            log.warning(
                "batch_failed", **labels, reason=str(outcome.error), messages=len(batch.values)
            )
        self._enter_cooldown()
        return {}

    def _enter_cooldown(self) -> None:
        """A batch failed: stop reading, drop what is buffered, rewind once settled."""
        if self._cooldown_until is None:
            self._cooldown_until = time.monotonic() + 1.0
        self._pause_all()
        self._batch = _Batch(self._next_batch)

    def _maybe_recover(self) -> None:
        if self._cooldown_until is None or self._tracker.in_flight():
            return
        if time.monotonic() < self._cooldown_until:
            return
        self._cooldown_until = None
        self._tracker = OffsetTracker()  # failed partitions restart from their commits
        if self._want_active and not self._stopped_reason:
            self._resume(self._start_mode)

    # --- commands -----------------------------------------------------------------------

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Activate):
                self._start_mode = cmd.start
                if not self._want_active:
                    self._want_active = True
                    self._metrics.destination_active.labels(**self._labels).set(1)
                    if self._cooldown_until is None and not self._stopped_reason:
                        self._resume(cmd.start)
            else:
                self._deactivate(cmd)

    def _deactivate(self, cmd: _Deactivate) -> None:
        was_active = self._want_active
        self._want_active = False
        self._metrics.destination_active.labels(**self._labels).set(0)
        self._pause_all()
        if cmd.graceful:
            self._submit()
            self._drain_in_flight()
        else:
            self._batch = _Batch(self._next_batch)
        if was_active:
            log.info(
                "destination_state",
                **self._labels,
                from_state="active",
                to_state="paused",
                reason=cmd.reason,
                graceful=cmd.graceful,
            )
        cmd.done.set()

    def _drain_in_flight(self) -> None:
        """Wait for every batch in flight, then commit what they made committable."""
        deadline = time.monotonic() + self.spec.write_deadline
        while self._tracker.in_flight() and time.monotonic() < deadline:
            self._settle_outcomes(block=True, timeout=0.1)
        self._settle_outcomes(block=False)
        self._flush_commits()

    def _flush_commits(self) -> None:
        """Commit synchronously the newest committable offsets (async commits may be queued)."""
        if self._committable:
            self._commit(dict(self._committable), asynchronous=False)

    # --- offsets ------------------------------------------------------------------------

    def _commit(self, offsets: Mapping[TopicPart, int], asynchronous: bool) -> None:
        self._committable.update(offsets)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items() if (t, p) in self._assigned]
        if not tps:
            return
        try:
            if asynchronous:
                self._consumer.commit(offsets=tps, asynchronous=True)
            else:
                self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            log.warning("commit_failed", **self._labels, error=str(exc))

    def _start_offsets(self, tps: Sequence[TopicPart], mode: StartFrom) -> dict[TopicPart, int]:
        """Where each partition starts: own commit, or the max over the route's groups."""
        own = self._admin.committed(self.spec.group, tps)
        if mode is StartFrom.OWN:
            start = dict(own)
        else:
            start = {tp: NO_OFFSET for tp in tps}
            for group in self.spec.peer_groups:
                theirs = own if group == self.spec.group else self._admin.committed(group, tps)
                for tp in tps:
                    start[tp] = max(start[tp], theirs.get(tp, NO_OFFSET))
        marks = self._admin.watermarks(tps)
        moved_to: dict[TopicPart, int] = {}  # committed now, so a gap is recorded once
        for tp in tps:
            wm = marks[tp]
            s = start.get(tp, NO_OFFSET)
            if s < 0:
                # Never committed anywhere: the whole retained log. Committed at once, so
                # that data deleted before we write it is counted as lost, not unnoticed.
                s = wm.low
                moved_to[tp] = s
            elif s < wm.low:
                self._record_retention_gap(tp, s, wm.low)
                s = wm.low
                moved_to[tp] = s
            s = min(s, wm.high)
            if mode is StartFrom.SKIP:
                mine = own.get(tp, NO_OFFSET)
                base = mine if mine >= 0 else wm.low
                if s > base:
                    self._metrics.skipped.labels(**self._labels, topic=tp[0]).inc(s - base)
                    log.warning(
                        "skipped_range",
                        **self._labels,
                        topic=tp[0],
                        partition=tp[1],
                        first=base,
                        next=s,
                        count=s - base,
                    )
                    moved_to[tp] = s
            start[tp] = s
        if moved_to:  # a skip or a retention gap is recorded as this group's progress
            self._commit(moved_to, asynchronous=False)
        return start

    def _resume(self, mode: StartFrom) -> None:
        tps = sorted(self._assigned)
        if not tps:
            return
        try:
            starts = self._start_offsets(tps, mode)
            for tp in tps:
                self._consumer.seek(TopicPartition(tp[0], tp[1], starts[tp]))
            self._consumer.resume([TopicPartition(t, p) for t, p in tps])
        except (SourceError, KafkaException) as exc:
            # e.g. a seek before the partition's fetcher has its first offset (_STATE): retry
            log.warning("start_offsets_failed", **self._labels, error=str(exc))
            self._enter_cooldown()
            return
        self._live = set(tps)
        if mode is StartFrom.SKIP:
            self._start_mode = StartFrom.OWN  # skipped once; later rewinds use our commits
        log.info(
            "destination_state",
            **self._labels,
            from_state="paused",
            to_state="active",
            reason=f"start from {mode.value}",
            starts={f"{t}[{p}]": o for (t, p), o in starts.items()},
        )
        self._publish_partition_gauges()

    def _pause_all(self) -> None:
        if self._assigned:
            self._consumer.pause([TopicPartition(t, p) for t, p in self._assigned])
        self._live = set()
        self._publish_partition_gauges()

    def _publish_partition_gauges(self) -> None:
        self._metrics.assigned_partitions.labels(**self._labels).set(len(self._assigned))
        self._metrics.paused_partitions.labels(**self._labels).set(
            len(self._assigned) - len(self._live)
        )

    # --- rebalance callbacks (run inside consume(), on the consumer thread) ---------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        self._assigned = set(tps)
        active = self._want_active and self._cooldown_until is None and not self._stopped_reason
        if active and tps:
            try:
                starts = self._start_offsets(tps, self._start_mode)
            except SourceError as exc:
                log.warning("start_offsets_failed", **self._labels, error=str(exc))
                self._cooldown_until = time.monotonic() + 1.0
                active = False
            else:
                for tp in partitions:
                    tp.offset = starts[(tp.topic, tp.partition)]
                if self._start_mode is StartFrom.SKIP:
                    self._start_mode = StartFrom.OWN
        if not active:
            for tp in partitions:  # explicit, so a paused partition never sits in an error
                tp.offset = OFFSET_BEGINNING  # state; activation re-assigns its real start
        consumer.assign(partitions)
        if active:
            self._live = set(tps)
        else:
            consumer.pause(partitions)  # paused stays paused across a rebalance
            self._live = set()
        log.info(
            "partitions_assigned",
            **self._labels,
            partitions=len(tps),
            paused=0 if active else len(tps),
        )
        self._publish_partition_gauges()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Finish what is in flight and commit it before the partitions move elsewhere.
        self._batch = _Batch(self._next_batch)
        self._drain_in_flight()
        self._tracker = OffsetTracker()
        self._committable = {}
        self._assigned = set()
        self._live = set()
        self._publish_partition_gauges()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._batch = _Batch(self._next_batch)
        self._tracker = OffsetTracker()
        self._committable = {}
        self._assigned = set()
        self._live = set()
        self._publish_partition_gauges()

    # --- end ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._pause_all()
        if self._graceful_stop:
            self._submit()
            self._drain_in_flight()
        self._consumer.close()  # leaves the group
        self._sink.close()

    def _snapshot(self) -> DestinationStatus:
        if self._stopped_reason:
            state = "stopped"
        elif self._cooldown_until is not None:
            state = "cooldown"
        elif self._live:
            state = "active"
        else:
            state = "active" if self._want_active and not self._assigned else "paused"
        return DestinationStatus(
            route=self.spec.route,
            cluster=self.spec.cluster,
            group=self.spec.group,
            state=state,
            assigned=tuple(sorted(self._assigned)),
            paused=tuple(sorted(self._assigned - self._live)),
            in_flight=self._tracker.in_flight(),
            buffered=len(self._batch.values),
            error=self._stopped_reason,
        )

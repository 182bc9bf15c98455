"""The write pool of one destination: batches go to InfluxDB on worker threads, and every
outcome, whatever happened, comes back on one queue that the consumer thread reads.

There is no ``Future`` done-callback (an exception raised there is logged and swallowed by
``concurrent.futures``): the worker itself turns every result into an ``Outcome``, including an
exception nobody expected (a bug, an httpx error that is not a transport error), which becomes a
failed batch of kind ``internal``. So a batch can never stay in flight without an answer.

A write has two steps: the sink writes the lines (InfluxDB's 400 names the bad ones), then the
bad lines are confirmed on the dead-letter topic. When only the second step failed, the batch
keeps its letters and ``written=True``: a retry delivers the letters again and never rewrites or
re-bisects the lines.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from router.batch import Batch
from router.errors import SinkError, SinkMisconfigured, SinkTimeout, SinkTlsError, SourceError
from router.kafka import DeadLetter
from router.sink import Rejected

log = structlog.get_logger("router")


class Sink(Protocol):
    """What the writers need of an InfluxDB cluster (``router.sink.InfluxSink``)."""

    def write(self, payloads: Sequence[bytes]) -> list[Rejected]: ...
    def close(self) -> None: ...


class DeadLetters(Protocol):
    """What the writers need of the dead-letter topic (``router.kafka.DeadLetterProducer``)."""

    @property
    def topic(self) -> str: ...
    def send(self, letters: list[DeadLetter], timeout: float = ...) -> int: ...


FailureKind = Literal["unavailable", "timeout", "tls", "misconfigured", "dead_letter", "internal"]


@dataclass(frozen=True)
class Outcome:
    batch: Batch
    kind: FailureKind | None = None  # None: written and every letter delivered
    reason: str = ""
    rejected: int = 0  # lines InfluxDB refused (sent to the dead letters)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.kind is None


class WritePool:
    """``max_in_flight`` worker threads writing batches of one (route, cluster)."""

    def __init__(
        self,
        *,
        route: str,
        cluster: str,
        sink: Sink,
        dead_letters: DeadLetters,
        workers: int,
    ) -> None:
        self._route = route
        self._cluster = cluster
        self._sink = sink
        self._dlq = dead_letters
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"write-{cluster}")
        self.outcomes: queue.Queue[Outcome] = queue.Queue()

    def submit(self, batch: Batch) -> None:
        """Write ``batch`` (or only deliver its letters, if already written) on a worker."""
        self._pool.submit(self._run, batch)

    def get(self, timeout: float | None) -> list[Outcome]:
        """Every outcome available; wait up to ``timeout`` for the first (None: don't wait)."""
        out: list[Outcome] = []
        try:
            if timeout is None:
                out.append(self.outcomes.get_nowait())
            else:
                out.append(self.outcomes.get(timeout=timeout))
            while True:
                out.append(self.outcomes.get_nowait())
        except queue.Empty:
            pass
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sink.close()

    def _run(self, batch: Batch) -> None:
        started = time.monotonic()
        try:
            outcome = self._write(batch)
        except Exception as exc:  # deliberate: every outcome reaches the owner
            log.exception(
                "write_internal_error",
                route=self._route,
                cluster=self._cluster,
                error_type=type(exc).__name__,
            )
            outcome = Outcome(batch, "internal", f"internal: {type(exc).__name__}: {exc}")
        self.outcomes.put(
            Outcome(
                outcome.batch,
                outcome.kind,
                outcome.reason,
                outcome.rejected,
                time.monotonic() - started,
            )
        )

    def _write(self, batch: Batch) -> Outcome:
        rejected = 0
        if not batch.written:
            try:
                refused = self._sink.write(batch.values) if batch.values else []
            except SinkMisconfigured as exc:
                return Outcome(batch, "misconfigured", str(exc))
            except SinkTimeout as exc:
                return Outcome(batch, "timeout", str(exc))
            except SinkTlsError as exc:
                return Outcome(batch, "tls", str(exc))
            except SinkError as exc:
                return Outcome(batch, "unavailable", str(exc))
            batch.letters = batch.dead + [
                DeadLetter(
                    line=r.line,
                    reason=r.reason,
                    topic=batch.origins[r.index][0],
                    partition=batch.origins[r.index][1],
                    offset=batch.offsets[r.index],
                    cluster=self._cluster,
                    route=self._route,
                )
                for r in refused
            ]
            rejected = len(refused)
            batch.refused = rejected
            batch.written = True
            batch.values = []  # a retry only delivers the letters: no need to keep the lines
            batch.origins = []
            batch.offsets = []
        if batch.letters and not batch.letters_delivered:
            try:
                self._dlq.send(batch.letters)
            except SourceError as exc:
                return Outcome(batch, "dead_letter", str(exc), rejected)
            batch.letters_delivered = True
        return Outcome(batch, None, "", rejected)

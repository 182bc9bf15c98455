"""The Kafka adapter for everything that is not the consume loop: group offsets, watermarks,
topic discovery and dead letters. confluent-kafka errors become ``SourceError`` here.

Every librdkafka client of the router (consumers, producers, admin clients, here and in
``router.source``, ``router.membership``, ``router.backfill``) is built from
``client_config``, which adds ``KAFKA_LOG``: librdkafka's own log lines become structlog
events ``kafka_log`` (``facility``, ``client``, ``message``) at their level, with every secret
the process has read cut out (``router.secrets.scrub``), instead of raw lines on stderr.
confluent-kafka delivers them on the thread that polls the client, so the handles that never
fetch (offset readers, the admin client, the dead-letter producer) are polled by ``serve``.

``check_access`` connects once with a section's settings and tells whether the brokers refuse
them: a failed SASL authentication or TLS handshake is ``KafkaRefused`` (the router exits 2
at start, a reload keeps the previous section), naming the brokers and the mechanism.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
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

from router.errors import DeadLetterError, KafkaRefused, SourceError
from router.offsets import NO_OFFSET, TopicPart
from router.offsets import Marks as Watermarks
from router.secrets import scrub

log = structlog.get_logger("router")
kafka_log = structlog.get_logger("librdkafka")

# confluent-kafka maps syslog levels to logging's numbers; structlog's method of each
_LEVELS = ((40, "error"), (30, "warning"), (20, "info"))


class KafkaLog:
    """What confluent-kafka calls as ``logger``: ``log(level, "%s [%s] %s", fac, name, line)``.

    Each line becomes one ``kafka_log`` event, secrets scrubbed. It never raises: an exception
    here would end the poll call that delivered the line.
    """

    def log(self, level: int, msg: str, *args: object) -> None:
        try:
            facility, client, line = (str(a) for a in args) if len(args) == 3 else ("", "", "")
            message = line if len(args) == 3 else (msg % args if args else msg)
        except (TypeError, ValueError):
            facility, client, message = "", "", " ".join(map(str, (msg, *args)))
        method = next((name for floor, name in _LEVELS if level >= floor), "debug")
        getattr(kafka_log, method)(
            "kafka_log", facility=facility, client=client, message=scrub(message)
        )


KAFKA_LOG = KafkaLog()


def client_config(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of one librdkafka client: ``parts`` merged in order (later ones win), and
    the router's logger. Every Consumer, Producer and AdminClient is built from this."""
    config: dict[str, Any] = {}
    for part in parts:
        config.update(part)
    config["logger"] = KAFKA_LOG
    return config


_REFUSALS = {
    KafkaError._AUTHENTICATION: "the brokers refused the router's credentials",
    KafkaError._SSL: "TLS with the brokers failed",
}


KAFKA_CHECK_TIMEOUT = 10.0  # longest wait for the brokers' verdict on kafka settings


def check_access(
    config: Mapping[str, str], *, datacenter: str = "", timeout: float = KAFKA_CHECK_TIMEOUT
) -> str:
    """Connect once with ``config`` and read the cluster's metadata.

    Returns ``"ok"``, or ``"unreachable"`` (no broker answered: nothing can be said about
    the credentials yet) or ``"timeout"``. Raises ``KafkaRefused`` as soon as librdkafka
    reports a failed SASL authentication (``_AUTHENTICATION``) or TLS handshake (``_SSL``).
    """
    errors: list[KafkaError] = []
    try:
        admin = AdminClient(client_config(config, {"error_cb": errors.append}))
    except KafkaException as exc:
        raise SourceError(f"cannot create a Kafka client: {scrub(str(exc))}") from exc
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        try:
            admin.list_topics(timeout=min(0.5, left))
            return "ok"
        except KafkaException:
            pass  # the reason, if any, comes through error_cb
        admin.poll(0)
        for err in errors:
            if _refusal(err) is not None:
                raise _refused(config, err, datacenter)
        if any(err.code() == KafkaError._ALL_BROKERS_DOWN for err in errors):
            return "unreachable"


def _refusal(err: KafkaError) -> str | None:
    """What a librdkafka error says about our settings: refused credentials, failed TLS (a
    broker certificate we do not trust, or a TLS alert: our client certificate refused), or
    nothing (None: a broker down, a timeout)."""
    if err.code() in _REFUSALS:
        return _REFUSALS[err.code()]
    text = err.str()
    if err.code() == KafkaError._TRANSPORT and ("SSL routines" in text or "tls alert" in text):
        return _REFUSALS[KafkaError._SSL]  # e.g. "ssl/tls alert bad certificate"
    return None


_TOKEN_FAILURE = "Failed to acquire SASL OAUTHBEARER token"  # librdkafka, OIDC


def _refused(config: Mapping[str, str], err: KafkaError, datacenter: str) -> KafkaRefused:
    mechanism = config.get("sasl.mechanism", "") if err.code() == KafkaError._AUTHENTICATION else ""
    where = f"kafka {config.get('bootstrap.servers', '?')}"
    if datacenter:
        where += f" (datacenter {datacenter})"
    how = f"SASL {mechanism}" if mechanism else config.get("security.protocol", "")
    what = _refusal(err)
    if not mechanism:
        hint = "check kafka.tls (ca_file: the CA of the brokers' certificates; cert_file/key_file)"
    elif mechanism == "OAUTHBEARER":
        hint = "check kafka.sasl_oauthbearer (token_endpoint_url, client id and secret, scope)"
        if _TOKEN_FAILURE in err.str():
            what = "the token endpoint refused the router's client credentials"
    else:
        hint = "check kafka.sasl_username_env and sasl_password_env/sasl_password_file"
    return KafkaRefused(
        f"{where}: {what} ({how}): {scrub(err.str())}; {hint}",
        mechanism=mechanism,
        code=err.name(),
    )


_EARLIEST: OffsetSpec = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
_LATEST: OffsetSpec = OffsetSpec.latest()  # type: ignore[no-untyped-call]


class _Reader:
    """A non-subscribing consumer handle of one group; one call at a time (``lock``)."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.lock = threading.Lock()
        self.closed = False  # set under ``lock`` by KafkaAdmin.retain/close


class KafkaAdmin:
    """Reads any group's committed offsets and the partitions' watermarks.

    Every read takes ``timeout`` (seconds; the default given at construction) as its deadline.
    Safe to call from several threads. Offset readers are one consumer handle per group, kept
    until ``retain`` drops the groups that went away (or ``close``).
    """

    def __init__(self, config: Mapping[str, str], timeout: float = 10.0) -> None:
        self._config = dict(config)
        try:
            self._admin = AdminClient(client_config(config))
        except KafkaException as exc:  # a setting librdkafka refuses (client_config)
            raise SourceError(f"cannot create the Kafka admin client: {scrub(str(exc))}") from exc
        self._timeout = timeout
        self._readers: dict[str, _Reader] = {}
        self._readers_lock = threading.Lock()
        self._peek: _Reader | None = None  # reads single messages' timestamps (never commits)

    def partitions(self, topics: Iterable[str], *, timeout: float | None = None) -> list[TopicPart]:
        """Every partition of the named topics; a name starting with ``^`` is a regex."""
        try:
            md = self._admin.list_topics(timeout=self._timeout if timeout is None else timeout)
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

    def committed(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, int]:
        """The group's committed offset per partition (NO_OFFSET where it has none)."""
        return {tp: o for tp, (o, _) in self.commits(group, tps, timeout=timeout).items()}

    def commits(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, tuple[int, str]]:
        """The group's committed offset and commit metadata per partition.

        Read with a consumer handle of that group that never subscribes (so it never joins),
        not with AdminClient.list_consumer_group_offsets: librdkafka 2.16 crashes (SIGSEGV in
        rd_kafka_handle_OffsetFetch -> rd_kafka_cgrp_op on an admin handle) when that request
        meets a retriable error such as COORDINATOR_LOAD_IN_PROGRESS on a fresh broker.
        """
        req = [TopicPartition(t, p) for t, p in tps]
        if not req:
            return {}
        wait = self._timeout if timeout is None else timeout
        try:
            while True:
                reader = self._reader(group)
                with reader.lock:
                    if reader.closed:  # retain() dropped it meanwhile: take a fresh handle
                        continue
                    result = reader.consumer.committed(req, timeout=wait)
                    break
        except KafkaException as exc:
            raise SourceError(f"cannot read committed offsets of {group}: {exc!r}") from exc
        out: dict[TopicPart, tuple[int, str]] = {}
        for tp in result:
            if tp.error is not None:
                raise SourceError(
                    f"committed offset of {group} {tp.topic}[{tp.partition}]: {tp.error}"
                )
            offset = tp.offset if tp.offset >= 0 else NO_OFFSET
            out[(tp.topic, tp.partition)] = (offset, tp.metadata or "")
        return out

    def _reader(self, group: str) -> _Reader:
        with self._readers_lock:
            entry = self._readers.get(group)
            if entry is None:
                consumer = Consumer(
                    client_config(self._config, {"group.id": group, "enable.auto.commit": "false"})
                )
                entry = _Reader(consumer)
                self._readers[group] = entry
            return entry

    @property
    def reader_groups(self) -> frozenset[str]:
        """The groups that have an open offset-reader handle."""
        with self._readers_lock:
            return frozenset(self._readers)

    def retain(self, groups: Iterable[str]) -> list[str]:
        """Close the offset-reader handles of every group not in ``groups`` (routes removed, or
        rebuilt with other clusters); returns the groups whose handle was closed. A closed
        group's handle is opened again if it is read later."""
        keep = set(groups)
        with self._readers_lock:
            gone = {g: r for g, r in self._readers.items() if g not in keep}
            for g in gone:
                del self._readers[g]
        for reader in gone.values():
            self._close_reader(reader)
        return sorted(gone)

    @staticmethod
    def _close_reader(reader: _Reader) -> None:
        with reader.lock, contextlib.suppress(KafkaException, RuntimeError):
            reader.closed = True
            reader.consumer.close()

    def close(self) -> None:
        with self._readers_lock:
            readers = list(self._readers.values())
            self._readers = {}
            if self._peek is not None:
                readers.append(self._peek)
                self._peek = None
        for reader in readers:
            self._close_reader(reader)

    def serve(self) -> None:
        """Deliver what librdkafka queued for the handles that never fetch (log lines, errors):
        the admin client and each offset reader not busy right now. Never waits."""
        with contextlib.suppress(KafkaException, RuntimeError):
            self._admin.poll(0)
        with self._readers_lock:
            readers = list(self._readers.values())
            if self._peek is not None:
                readers.append(self._peek)
        for reader in readers:
            if not reader.lock.acquire(blocking=False):
                continue  # in use: served next time
            try:
                if not reader.closed:
                    with contextlib.suppress(KafkaException, RuntimeError):
                        reader.consumer.poll(0)
            finally:
                reader.lock.release()

    def _peek_reader(self) -> _Reader:
        with self._readers_lock:
            if self._peek is None:
                self._peek = _Reader(
                    Consumer(
                        client_config(
                            self._config,
                            {
                                "group.id": "frouter-peek",  # required by librdkafka; never used
                                "enable.auto.commit": "false",
                                "enable.auto.offset.store": "false",
                                "max.partition.fetch.bytes": "65536",
                                "queued.max.messages.kbytes": "1024",
                            },
                        )
                    )
                )
            return self._peek

    def offsets_at(
        self, tps: Iterable[TopicPart], when: float, *, timeout: float | None = None
    ) -> dict[TopicPart, int]:
        """Per partition, the offset of the first message whose timestamp is at or after
        ``when`` (seconds since the epoch); the high watermark where there is none."""
        parts = [TopicPartition(t, p, int(when * 1000)) for t, p in tps]
        if not parts:
            return {}
        wait = self._timeout if timeout is None else timeout
        reader = self._peek_reader()
        with reader.lock:
            try:
                found = reader.consumer.offsets_for_times(parts, timeout=wait)
            except KafkaException as exc:
                raise SourceError(f"cannot look up offsets by time: {exc!r}") from exc
        out: dict[TopicPart, int] = {}
        marks: dict[TopicPart, Watermarks] | None = None
        for tp in found:
            if tp.error is not None:
                raise SourceError(f"offset by time of {tp.topic}[{tp.partition}]: {tp.error}")
            if tp.offset < 0:  # no message that late: the end
                if marks is None:
                    marks = self.watermarks([(x.topic, x.partition) for x in found], timeout=wait)
                out[(tp.topic, tp.partition)] = marks[(tp.topic, tp.partition)].high
            else:
                out[(tp.topic, tp.partition)] = tp.offset
        return out

    def timestamps(
        self, wanted: Mapping[TopicPart, int], *, timeout: float | None = None
    ) -> dict[TopicPart, float]:
        """The timestamp (seconds since the epoch) of the first message at or after the given
        offset of each partition: with the committed offset, the age of the oldest message a
        group has not written. One small fetch per partition, by a consumer that is assigned
        the partitions (it never joins or commits to a group). A partition whose message did
        not arrive within the deadline, or has no timestamp, is left out."""
        if not wanted:
            return {}
        wait = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        reader = self._peek_reader()
        got: dict[TopicPart, float] = {}
        with reader.lock:
            if reader.closed:
                return {}
            consumer = reader.consumer
            try:
                consumer.assign([TopicPartition(t, p, o) for (t, p), o in wanted.items()])
                while len(got) < len(wanted):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    for msg in consumer.consume(num_messages=500, timeout=min(left, 0.2)):
                        if msg.error() is not None:
                            continue
                        tp = (msg.topic() or "", msg.partition() or 0)
                        kind, ms = msg.timestamp()
                        if tp in wanted and tp not in got and (msg.offset() or 0) >= wanted[tp]:
                            if kind != 0 and ms >= 0:  # 0: TIMESTAMP_NOT_AVAILABLE
                                got[tp] = ms / 1000.0
                            else:
                                got[tp] = float("nan")
            except KafkaException as exc:
                raise SourceError(f"cannot read message timestamps: {exc!r}") from exc
            finally:
                with contextlib.suppress(KafkaException, RuntimeError):
                    consumer.unassign()
        return {tp: ts for tp, ts in got.items() if not math.isnan(ts)}  # NaN: no timestamp

    def watermarks(
        self, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, Watermarks]:
        """Low and high watermark per partition.

        librdkafka's ListOffsets goes to the leader its metadata cache names and does not
        refresh that cache when the leader answers that its epoch is stale (seen after a broker
        was frozen): then the metadata is read once and the request made once more.
        """
        parts = [TopicPartition(t, p) for t, p in tps]
        if not parts:
            return {}
        wait = self._timeout if timeout is None else timeout
        try:
            try:
                return self._list_offsets(parts, wait)
            except KafkaException as exc:
                if not _stale_leader(exc):
                    raise
                self._admin.list_topics(timeout=wait)  # refreshes leaders and their epochs
                return self._list_offsets(parts, wait)
        except (KafkaException, TimeoutError) as exc:
            raise SourceError(f"cannot list offsets: {exc!r}") from exc

    def _list_offsets(
        self, parts: list[TopicPartition], wait: float
    ) -> dict[TopicPart, Watermarks]:
        lows = self._admin.list_offsets({tp: _EARLIEST for tp in parts}, request_timeout=wait)
        highs = self._admin.list_offsets({tp: _LATEST for tp in parts}, request_timeout=wait)
        return {
            (tp.topic, tp.partition): Watermarks(
                lows[tp].result(timeout=wait).offset,
                highs[tp].result(timeout=wait).offset,
            )
            for tp in parts
        }

    def lag(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, int]:
        """Messages the group has not committed yet, per partition (never negative).

        A partition the group never committed counts from the low watermark.
        """
        parts = list(tps)
        marks = self.watermarks(parts, timeout=timeout)
        return lag_of(self.committed(group, parts, timeout=timeout), marks)


_STALE_LEADER = frozenset(
    {
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
    }
)


def _stale_leader(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and err.code() in _STALE_LEADER


def lag_of(
    committed: Mapping[TopicPart, int], marks: Mapping[TopicPart, Watermarks]
) -> dict[TopicPart, int]:
    """Messages not committed yet per partition of ``marks`` (never negative); a partition
    never committed (or committed below the low watermark) counts from the low watermark."""
    out = {}
    for tp, wm in marks.items():
        pos = committed.get(tp, NO_OFFSET)
        start = wm.low if pos < 0 else max(pos, wm.low)
        out[tp] = max(0, wm.high - start)
    return out


# --- dead letters -------------------------------------------------------------------------

DEFAULT_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes
HEADER_ROOM = 1024  # record and batch framing that librdkafka's size check does not count
REASON_MAX_BYTES = 4096  # InfluxDB quotes the whole refused line in its reason
DELIVERY_TIMEOUT = 10.0  # seconds librdkafka may take to store one letter (message.timeout.ms)
_VERDICT_MARGIN = 5.0  # send() waits this much longer, so librdkafka's own verdict comes first
_POLL_INTERVAL = 0.05  # longest a sender sleeps in poll() before looking at its own letters
_ELLIPSIS = b"..."

# What an operator should check, by the Kafka error a letter failed with.
_HINTS = {
    "_UNKNOWN_TOPIC": "the topic does not exist; create it (the router does not)",
    "UNKNOWN_TOPIC_OR_PART": "the topic does not exist; create it (the router does not)",
    "TOPIC_AUTHORIZATION_FAILED": "the router may not write to the topic (ACL)",
    "CLUSTER_AUTHORIZATION_FAILED": "the router may not use an idempotent producer (ACL)",
    "MSG_SIZE_TOO_LARGE": "the record exceeds the topic's max.message.bytes",
    "_MSG_SIZE_TOO_LARGE": "the record exceeds the producer's message.max.bytes",
    "_MSG_TIMED_OUT": "no broker stored it within message.timeout.ms",
    "_FATAL": "fatal producer error; the producer is rebuilt on the next send",
}


@dataclass(frozen=True)
class DeadLetter:
    line: bytes
    reason: str
    topic: str
    partition: int
    offset: int
    cluster: str
    route: str


def fit_letter(line: bytes, limit: int) -> tuple[bytes, int | None]:
    """``line`` cut to at most ``limit`` bytes: ``(bytes, original length)``, or ``(line, None)``
    when it fits. The cut backs off (at most 3 bytes) rather than split a UTF-8 character."""
    if len(line) <= limit:
        return line, None
    keep = max(limit, 0)
    for candidate in range(keep, max(keep - 3, 0) - 1, -1):
        if line[candidate] & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            keep = candidate
            break
    return line[:keep], len(line)


def shorten_reason(reason: str, limit: int = REASON_MAX_BYTES) -> tuple[bytes, int | None]:
    """The reason as UTF-8, at most ``limit`` bytes: its start and its end (where InfluxDB says
    why) joined by ``...``; ``(bytes, original length)`` or ``(bytes, None)`` when it fits."""
    raw = reason.encode()
    if len(raw) <= limit:
        return raw, None
    tail_len = limit // 4
    head, _ = fit_letter(raw, limit - tail_len - len(_ELLIPSIS))
    tail = raw[len(raw) - tail_len :]
    start = 0
    while start < min(3, len(tail)) and tail[start] & 0xC0 == 0x80:
        start += 1  # do not start inside a UTF-8 character
    return head + _ELLIPSIS + tail[start:], len(raw)


def encode_letter(
    dl: DeadLetter, max_message_bytes: int = DEFAULT_MESSAGE_MAX_BYTES
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of one dead-letter record, sized to fit ``max_message_bytes``.

    Headers: ``reason``, ``source_topic``, ``source_partition``, ``source_offset``, ``cluster``,
    ``route``; plus ``truncated`` (the line's original length, decimal) when the line was cut,
    and ``reason_truncated`` (the reason's original length) when the reason was shortened.
    """
    reason, reason_len = shorten_reason(dl.reason)
    headers = [
        ("reason", reason),
        ("source_topic", dl.topic.encode()),
        ("source_partition", str(dl.partition).encode()),
        ("source_offset", str(dl.offset).encode()),
        ("cluster", dl.cluster.encode()),
        ("route", dl.route.encode()),
    ]
    if reason_len is not None:
        headers.append(("reason_truncated", str(reason_len).encode()))
    room = max_message_bytes - HEADER_ROOM - sum(len(k) + len(v) for k, v in headers)
    room -= len("truncated") + len(str(len(dl.line)))  # the header a cut adds
    value, original = fit_letter(dl.line, room)
    if original is not None:
        headers.append(("truncated", str(original).encode()))
    return value, headers


def describe_kafka_error(err: KafkaError) -> str:
    """``NAME (librdkafka's text)``, with what to check when the error is a known one."""
    hint = _HINTS.get(err.name())
    text = f"{err.name()} ({err.str()})"
    return f"{text}: {hint}" if hint else text


def _is_fatal(err: KafkaError) -> bool:
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


def _message_max_bytes(config: Mapping[str, str]) -> int:
    raw = config.get("message.max.bytes", str(DEFAULT_MESSAGE_MAX_BYTES))
    try:
        return int(raw)
    except ValueError as exc:
        raise SourceError(f"message.max.bytes must be an integer, got {raw!r}") from exc


class _Deliveries:
    """The delivery reports of one ``send()`` call. ``on_delivery`` runs on whichever thread
    polls the shared producer, so it touches this object only, under this object's lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = 0
        self._stored = 0
        self._failed = 0
        self._first_error: KafkaError | None = None

    def expect(self) -> None:
        """Count one letter before it is handed to produce() (its report may come at once)."""
        with self._lock:
            self._pending += 1

    def forget(self) -> None:
        """produce() refused the letter: no report will come for it."""
        with self._lock:
            self._pending -= 1

    def on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        with self._lock:
            self._pending -= 1
            if err is None:
                self._stored += 1
                return
            self._failed += 1
            if self._first_error is None:
                self._first_error = err

    def state(self) -> tuple[int, int, int, KafkaError | None]:
        """(pending, stored, failed, first error)."""
        with self._lock:
            return self._pending, self._stored, self._failed, self._first_error


class _Client:
    """One librdkafka producer and the fatal error it reported (after which it is unusable)."""

    def __init__(self, config: Mapping[str, str]) -> None:
        self.fatal: KafkaError | None = None
        self.last_error: tuple[float, KafkaError] | None = None
        try:
            self.producer = Producer(client_config(config, {"error_cb": self._on_error}))
        except KafkaException as exc:
            raise SourceError(f"cannot create the dead-letter producer: {scrub(str(exc))}") from exc

    def _on_error(self, err: KafkaError) -> None:
        # runs on a polling thread; single attribute stores only
        if _is_fatal(err):
            self.fatal = err
        self.last_error = (time.monotonic(), err)

    def failed_fatally(self, err: KafkaError) -> None:
        if self.fatal is None:
            self.fatal = err

    def describe(self, err: KafkaError) -> str:
        """The error, and the fatal error behind it if that is another one."""
        text = describe_kafka_error(err)
        fatal = self.fatal
        if fatal is not None and fatal.code() != err.code():
            text += f" (fatal error: {describe_kafka_error(fatal)})"
        return text

    def recent_error(self, since: float) -> str:
        """``; last client error: ...`` if the client reported one after ``since``, else ``""``."""
        recent = self.last_error
        if recent is None or recent[0] < since:
            return ""
        return f"; last client error: {describe_kafka_error(recent[1])}"

    def discard(self) -> None:
        """Drop what is still queued on a producer that will not be used again."""
        with contextlib.suppress(KafkaException, RuntimeError):
            self.producer.purge()
            self.producer.poll(0)


class _SharedClient:
    """The producer every sender shares; replaced after a fatal error, under a short lock."""

    def __init__(self, config: Mapping[str, str]) -> None:
        self.config = dict(config)
        self._lock = threading.Lock()  # guards _client; never held while waiting on Kafka
        self._client = _Client(self.config)

    def poll(self) -> None:
        """Serve the current producer's callbacks (no rebuild here: ``current`` does that)."""
        with self._lock:
            client = self._client
        with contextlib.suppress(KafkaException, RuntimeError):
            client.producer.poll(0)

    def current(self, topic: str) -> _Client:
        """The producer to use now: a new one if the current one reported a fatal error."""
        with self._lock:
            old = self._client
            if old.fatal is None:
                return old
            self._client = new = _Client(self.config)  # builds locally, no network I/O
        log.warning(
            "dead_letter_producer_rebuilt", topic=topic, reason=describe_kafka_error(old.fatal)
        )
        old.discard()
        return new


class DeadLetterProducer:
    """Sends rejected lines to the dead-letter topic, confirmed before their batch commits.

    Threads: every writer thread calls ``send()`` on one shared librdkafka producer
    (``with_topic()`` gives a sender to another topic on the same one). A call waits for its
    own letters only: each produced letter reports to that call's ``_Deliveries``, and the call
    polls the producer (from its own thread) until those reports are in or its deadline passes.
    Another destination's stuck letter cannot fail it, and no lock is held while it waits.

    Bounded failure: librdkafka gives every letter a verdict within ``delivery_timeout``
    (``message.timeout.ms``, default 10 s; a missing topic fails after half of it through
    ``topic.metadata.propagation.max.ms``); ``send()`` waits that long plus 5 s by default.
    Anything but "all stored" raises ``DeadLetterError`` naming the topic and the first Kafka
    error (``_UNKNOWN_TOPIC``, ``TOPIC_AUTHORIZATION_FAILED``, ``MSG_SIZE_TOO_LARGE``,
    ``_MSG_TIMED_OUT``, ``_FATAL``...), never a secret. The producer is idempotent
    (``acks=all``): librdkafka's own retries store a letter once. A fatal error (for example a
    fenced or out-of-sequence idempotent producer) makes the librdkafka producer unusable: the
    next ``send()`` builds a new one and logs ``dead_letter_producer_rebuilt``.

    Over-size letters: a record must fit the producer's ``message.max.bytes`` (taken from the
    Kafka client settings, default 1,000,000 bytes). A longer line is truncated to fit: the
    record's value is the line's first bytes (cut on a UTF-8 character boundary), up to
    ``message.max.bytes`` minus its headers minus 1 KiB of framing room, and the header
    ``truncated`` holds the line's original length in bytes (decimal ASCII); ``reason`` and the
    source headers are unchanged, so the bad message can still be found at its source offset.
    A reason longer than 4 KiB (InfluxDB quotes the whole refused line in it) keeps its first
    3 KiB and its last 1 KiB joined by ``...``, with ``reason_truncated`` holding its original
    length. A topic whose ``max.message.bytes`` is below the producer's limit still refuses such
    a record: that is a ``DeadLetterError`` (``MSG_SIZE_TOO_LARGE``) until the topic is fixed.
    """

    def __init__(
        self,
        config: Mapping[str, str],
        topic: str,
        *,
        delivery_timeout: float = DELIVERY_TIMEOUT,
    ) -> None:
        timeout_ms = int(delivery_timeout * 1000)
        if timeout_ms <= 100:
            raise ValueError("delivery_timeout must be more than 0.1 s")
        self.topic = topic
        self.delivery_timeout = delivery_timeout
        self._shared = _SharedClient(
            {
                **config,
                "enable.idempotence": "true",
                "acks": "all",
                "linger.ms": "5",
                "message.timeout.ms": str(timeout_ms),
                "request.timeout.ms": str(min(30_000, timeout_ms)),
                "topic.metadata.propagation.max.ms": str(timeout_ms // 2),
            }
        )
        self._max_bytes = _message_max_bytes(self._shared.config)

    def with_topic(self, topic: str) -> DeadLetterProducer:
        """The same librdkafka producer (same settings, same rebuilds) writing to ``topic``."""
        other = copy.copy(self)
        other.topic = topic
        return other

    def send(self, letters: Iterable[DeadLetter], timeout: float | None = None) -> int:
        """Produce ``letters`` and wait until each is stored; return how many were sent.

        Waits at most ``timeout`` seconds (default: the delivery timeout plus 5 s) for this
        call's letters only. Raises DeadLetterError unless every letter was stored.
        """
        wait = self.delivery_timeout + _VERDICT_MARGIN if timeout is None else timeout
        started = time.monotonic()
        deadline = started + wait
        client = self._shared.current(self.topic)
        deliveries = _Deliveries()
        count = 0
        for dl in letters:
            value, headers = encode_letter(dl, self._max_bytes)
            self._produce(client, deliveries, value, headers, deadline)
            count += 1
        pending, _, failed, first = deliveries.state()
        while pending and not failed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            client.producer.poll(min(_POLL_INTERVAL, left))
            pending, _, failed, first = deliveries.state()
        if failed and first is not None:
            if _is_fatal(first):
                client.failed_fatally(first)
            why = client.describe(first)
            if first.code() == KafkaError._MSG_TIMED_OUT:
                why += client.recent_error(started)
            raise DeadLetterError(
                f"dead letters to {self.topic}: {failed} of {count} not stored: {why}",
                topic=self.topic,
                code=first.name(),
            )
        if pending:
            raise DeadLetterError(
                f"dead letters to {self.topic}: {pending} of {count} not confirmed "
                f"within {wait:g}s{client.recent_error(started)}",
                topic=self.topic,
                code="unconfirmed",
            )
        return count

    def _produce(
        self,
        client: _Client,
        deliveries: _Deliveries,
        value: bytes,
        headers: list[tuple[str, bytes]],
        deadline: float,
    ) -> None:
        deliveries.expect()
        while True:
            try:
                client.producer.produce(
                    self.topic,
                    value=value,
                    headers=cast("list[tuple[str, str | bytes | None]]", headers),
                    on_delivery=deliveries.on_delivery,
                )
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    deliveries.forget()
                    raise DeadLetterError(
                        f"dead letters to {self.topic}: the producer's local queue stayed full",
                        topic=self.topic,
                        code="_QUEUE_FULL",
                    ) from None
                client.producer.poll(_POLL_INTERVAL)  # let reports drain the queue, then retry
            except KafkaException as exc:
                deliveries.forget()
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is None:
                    raise DeadLetterError(
                        f"dead letters to {self.topic}: produce failed: {exc}",
                        topic=self.topic,
                        code="unknown",
                    ) from exc
                if _is_fatal(err):
                    client.failed_fatally(err)
                raise DeadLetterError(
                    f"dead letters to {self.topic}: produce refused: {client.describe(err)}",
                    topic=self.topic,
                    code=err.name(),
                ) from exc

    def serve(self) -> None:
        """Deliver the producer's queued callbacks (log lines, errors). Never waits."""
        self._shared.poll()

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` seconds for every queued letter (at shutdown)."""
        self._shared.current(self.topic).producer.flush(timeout)

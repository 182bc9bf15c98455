"""The InfluxDB write adapter: the only module that talks to InfluxDB's write endpoint.

``InfluxSink.write(payloads)`` sends Kafka message values (line protocol, passed through as
bytes) to one InfluxDB cluster and sorts every answer once, Telegraf-style
(``plugins/outputs/influxdb/http.go``):

=====================================  ==================================================
answer                                 what the sink does
=====================================  ==================================================
204 / 200                              done: ``[]``
5xx, timeout, refused/reset, other     ``on_node_result(node, False)``, retry on the next
transport error, unexpected status     node after ``backoff(n)``; after ``max_retries``
                                       retries: ``SinkUnavailable`` (``SinkTimeout`` when the
                                       last failure was a timeout, ``SinkTlsError`` when it
                                       was TLS: certificate not trusted, wrong name...)
400 (partial write / unable to parse)  isolate the bad lines from the server's own message
422 (2.x: partial write)               (or by bisection when it does not name them all);
                                       the good lines are written; bad ones returned as
                                       ``Rejected``
413                                    split payloads, then lines, in halves; a single line
                                       still too large is ``Rejected``
401, 403, database/bucket/retention    ``SinkMisconfigured``, never retried (a 401/403 is
policy not found, request-level 400     sent once more if the credentials changed while
                                       the request was under way)
=====================================  ==================================================

Credentials come from ``InfluxTarget.credentials``, a callable asked before every request
(the topology's reader re-reads a secret file only when it changed): a rotated password or
token is what the next request sends, without rebuilding the sink. ``probe()`` sends an empty
write with the current credentials: InfluxDB 1.x answers it like a real write (401 bad
credentials, 403 no write permission, 404 unknown database, 500 unknown retention policy,
204 accepted) without storing anything.

The HTTP client comes from ``router.tls`` (``InfluxTarget.tls``: the cluster's CA bundle,
client certificate, or no verification), the same factory the health probes use, with
``trust_env=False``; it is rebuilt when one of its files changes. A TLS failure is told from
other transport errors: the failure says ``TLS: certificate verify failed: <why>`` and a
``tls_error`` event names the cluster and the node (once until that node works again).

Lines are only split on the 400/413 path, with InfluxDB 1.x's own scanner rules (a newline
inside a quoted string field value does not end a line), so the lines the server names match
ours byte for byte. Nothing from httpx escapes this module.

The answers of the servers this module knows (the unit tests pin each one):

- InfluxDB 1.x (1.6 and 1.8, on ``/write`` and 1.8's ``/api/v2/write`` alike): 400
  ``{"error": "partial write: unable to parse '<line>': <why>\nunable to parse ... dropped=0"}``
  (every other line written), or without ``partial write:`` when no line was; a type conflict
  is ``partial write: field type conflict: ... dropped=N`` and names no line.
- InfluxDB 1.x past its ``max-series-per-database`` (inmem index): 400 ``{"error": "partial
  write: max-series-per-database limit exceeded: (N) dropped=M"}`` names no line either: it is
  bisected, a part whose every line was dropped is refused at once with reason
  ``max-series-per-database limit exceeded: (N)``, and the node is not blamed (a 400).
- InfluxDB 2.x (from its source; not run here): a parse error refuses the whole request, 400
  ``{"code": "invalid", "message": "unable to parse '<line>': <why>..."}``; a type conflict
  is 422 ``{"code": "unprocessable entity", "message": "failure writing points to database:
  partial write: ... dropped=N"}``: the wrapper is dropped, and it is read as 1.x's.
- VictoriaMetrics (``flavor: victoriametrics``) refuses the whole request at its first bad
  line, 400 ``cannot process influx line protocol data: incorrect influx line "<that line and
  all later ones, Go-quoted>": <why>; see ...``: that line is named, the rest sent again. It
  reads an unknown ``precision`` (1.x's ``n``) by the timestamp's size, so it gets ``ns``.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog

from router.errors import (
    ConfigError,
    SinkMisconfigured,
    SinkTimeout,
    SinkTlsError,
    SinkUnavailable,
)
from router.secrets import scrub
from router.tls import ReloadingClient, TlsError, TlsSettings, http_client, tls_failure

__all__ = [
    "TOO_LARGE_REASON",
    "Credentials",
    "InfluxSink",
    "InfluxTarget",
    "Rejected",
    "default_backoff",
]

log = structlog.get_logger("router.sink")

TOO_LARGE_REASON = "line exceeds server max body size"

# InfluxDB 1.x only knows n/u/ms/s/m/h and silently reads anything else ("ns", "us") as
# nanoseconds; v2 wants ns/us/ms/s.
_V1_PRECISION = {"ns": "n", "us": "u", "ms": "ms", "s": "s"}
_PRECISIONS = frozenset(_V1_PRECISION)

_PARTIAL_PREFIX = "partial write: "
_PARSE_PREFIX = "unable to parse '"
_V2_WRITE_FAILURE = "failure writing points to database: "  # 2.x's wrapper of a 422
_VM_PARSE_PREFIX = 'cannot process influx line protocol data: incorrect influx line "'
_VM_SEE_ALSO = re.compile(r"; see https?://\S*\Z")
_ABOUT_LINES = (_PARTIAL_PREFIX, _PARSE_PREFIX, _VM_PARSE_PREFIX)  # answers that quote data
_GO_STRING = re.compile(r'((?:[^"\\]+|\\.)*)"', re.S)  # the rest of a Go-quoted string
_GO_TOKEN = re.compile(r"[^\\]+|\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)
_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_GO_ESCAPES.update({"\\": "\\", '"': '"', "'": "'"})
_DROPPED_SUFFIX = re.compile(r" dropped=(\d+)\Z")
SERIES_LIMIT_REASON = "max-series-per-database limit exceeded"  # 1.x, inmem index
_ENTRY_SEPARATOR = re.compile(r"\n(?=unable to parse ')")
_NOT_FOUND = re.compile(
    r"\b(database|bucket|org|organization|retention policy)\b[^\n]{0,200}\bnot found\b", re.I
)
_REQUEST_LEVEL_400 = re.compile(
    r"\b(database|bucket|org|organization) is required\b|\binvalid precision\b"
    r"|\bprecision supplied is not valid\b|\binvalid consistency\b",
    re.I,
)
_LP_SPECIAL = re.compile(rb'[\\" =,\n]')
_WHITESPACE = b" \t\x00"  # what InfluxDB's skipWhitespace skips at the start of a line
_MESSAGE_LIMIT = 300  # characters of a server answer quoted in an exception message


@dataclass(frozen=True)
class Credentials:
    """v1 basic auth (username and password) and/or a v2 token, as read now. Never shown."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def secrets(self) -> tuple[str, ...]:
        """Every value that must not appear in an error or a log line."""
        return tuple(s for s in (self.password, self.token, self.username) if s)


@dataclass(frozen=True)
class InfluxTarget:
    """What the sink needs of one cluster; the engine builds it from the topology.

    ``credentials``, when given, is asked before every request (it must be cheap when nothing
    changed, and may raise ConfigError when a secret cannot be read); otherwise ``username``,
    ``password`` and ``token`` are used as they are.
    """

    cluster: str
    api: Literal["v1", "v2"]
    flavor: Literal["influxdb", "victoriametrics"] = "influxdb"
    database: str | None = None
    retention_policy: str | None = None
    org: str | None = None
    bucket: str | None = None
    precision: Literal["ns", "us", "ms", "s"] = "ns"
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout: float = 5.0
    max_retries: int = 3
    compression: Literal["none", "gzip"] = "none"
    compression_level: int = 1  # gzip: 1 (fastest) .. 9
    credentials: Callable[[], Credentials] | None = field(default=None, repr=False, compare=False)
    tls: TlsSettings | None = None  # https only: CA, client certificate, verification

    def current_credentials(self) -> Credentials:
        """The credentials to send now. Raises ConfigError if a secret cannot be read."""
        if self.credentials is not None:
            return self.credentials()
        return Credentials(self.username, self.password, self.token)

    def __post_init__(self) -> None:
        if self.api not in ("v1", "v2"):
            raise ValueError(f"{self.cluster}: api must be v1 or v2, got {self.api!r}")
        if self.flavor not in ("influxdb", "victoriametrics"):
            raise ValueError(f"{self.cluster}: unknown flavor {self.flavor!r}")
        if self.api == "v1" and not self.database:
            raise ValueError(f"{self.cluster}: a v1 target needs a database")
        if self.api == "v2" and not self.bucket:
            raise ValueError(f"{self.cluster}: a v2 target needs a bucket")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"{self.cluster}: precision must be one of ns, us, ms, s")
        if self.timeout <= 0:
            raise ValueError(f"{self.cluster}: timeout must be > 0")
        if self.max_retries < 0:
            raise ValueError(f"{self.cluster}: max_retries must be >= 0")


@dataclass(frozen=True)
class Rejected:
    """One line InfluxDB refused: ``index`` points into the ``payloads`` given to write()."""

    index: int
    line: bytes
    reason: str


def default_backoff(attempt: int) -> float:
    """Sleep before retry ``attempt`` (0-based): 0.1s * 2**attempt capped at 2s, equal jitter."""
    base: float = min(2.0, 0.1 * 2.0 ** min(max(attempt, 0), 10))
    return base / 2 + random.uniform(0.0, base / 2)


# (index into payloads, exact bytes of one payload or one line)
_Unit = tuple[int, bytes]


@dataclass(frozen=True)
class _Auth:
    """What one set of credentials is sent as: basic auth (v1) or an Authorization header."""

    auth: httpx.Auth
    headers: dict[str, str]


_NO_AUTH = httpx.Auth()  # the base class sends the request as it is


class InfluxSink:
    """Writes batches to one InfluxDB cluster. Safe to call from several threads at once."""

    def __init__(
        self,
        target: InfluxTarget,
        nodes: Callable[[], Sequence[str]],
        *,
        on_node_result: Callable[[str, bool], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        backoff: Callable[[int], float] = default_backoff,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._target = target
        self._nodes = nodes
        self._on_node_result = on_node_result
        self._backoff = backoff
        self._sleep = sleep
        # the credentials of the last request and what they are sent as (replaced as a whole)
        self._auth: tuple[Credentials, _Auth] | None = None
        self._secrets: tuple[str, ...] = ()  # every secret sent so far: scrubbed from messages
        self._rr = itertools.count()
        self._rr_lock = threading.Lock()
        self._closed = False
        headers = {"Content-Type": "text/plain; charset=utf-8", "User-Agent": "failover-router"}
        if target.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        if target.api == "v1":
            self._path = "/write"
            precision: str = target.precision  # VictoriaMetrics: 1.x's "n" means "guess"
            if target.flavor == "influxdb":
                precision = _V1_PRECISION[target.precision]
            self._params = {"db": target.database or "", "precision": precision}
            if target.retention_policy:
                self._params["rp"] = target.retention_policy
        else:
            self._path = "/api/v2/write"
            self._params = {"bucket": target.bucket or "", "precision": target.precision}
            if target.org:
                self._params["org"] = target.org
        self._tls_failing: dict[str, str] = {}  # node -> TLS reason reported (tls_error)

        def build() -> httpx.Client:
            return http_client(
                target.tls,
                headers=headers,
                # pool=None: waiting for a free connection is back-pressure, not a node failure
                timeout=httpx.Timeout(target.timeout, pool=None),
                transport=transport,
            )

        try:
            self._client = ReloadingClient(target.cluster, target.tls, build)
        except TlsError as exc:  # a file changed or went away since the topology was loaded
            raise ConfigError(
                [f"clusters.{target.cluster}.tls.{exc.key}: {exc}"], source="tls"
            ) from None

    def __repr__(self) -> str:
        return f"InfluxSink(cluster={self._target.cluster!r}, api={self._target.api!r})"

    def __enter__(self) -> InfluxSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the keep-alive connections. The sink cannot write afterwards."""
        self._closed = True
        self._client.close()

    def write(self, payloads: Sequence[bytes]) -> list[Rejected]:
        """Write every line of ``payloads``; return the lines InfluxDB refused (maybe none).

        When it returns, every other line is stored. Raises ``SinkUnavailable`` /
        ``SinkTimeout`` when no node took the write within the retries, and
        ``SinkMisconfigured`` for answers that retrying cannot fix.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        answer: tuple[int, str] | None = None
        if payloads and all(payloads):  # the usual batch: sent as it is, no per-payload work
            answer = self._send(payloads)
            if answer[0] in (200, 204):
                return []
        units = [(i, p) for i, p in enumerate(payloads) if p]
        if not units:
            return []
        rejected = self._write_units(units, are_lines=False, answer=answer)
        return sorted(rejected, key=lambda r: r.index)  # stable: line order within a payload

    def probe(self) -> None:
        """Would a write be accepted now? An empty write with the current credentials.

        Returns when a node accepted it (2xx; or a 400 about the body, which v2 gives to an
        empty write once the token and the bucket passed). Raises ``SinkMisconfigured`` when
        it is refused as a write would be, ``SinkUnavailable`` when no node answered.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._send([])

    # --- credentials ------------------------------------------------------------------------

    def _credentials(self) -> tuple[Credentials, _Auth]:
        """The credentials to send now and their auth/headers (rebuilt only when changed)."""
        target = self._target
        try:
            creds = target.current_credentials()
        except ConfigError as exc:  # names the key and the file, never the secret
            raise SinkMisconfigured(
                f"{target.cluster}: credentials unreadable: {'; '.join(exc.errors)}",
                cluster=target.cluster,
            ) from exc
        current = self._auth
        if current is not None and current[0] == creds:
            return current
        auth = _NO_AUTH
        headers: dict[str, str] = {}
        if creds.token:
            headers["Authorization"] = f"Token {creds.token}"
        elif creds.username is not None:
            auth = httpx.BasicAuth(creds.username, creds.password or "")
        fresh = (creds, _Auth(auth, headers))
        self._secrets = tuple(dict.fromkeys((*creds.secrets(), *self._secrets)))[:8]
        self._auth = fresh
        return fresh

    # --- answer sorting --------------------------------------------------------------------

    def _write_units(
        self, units: list[_Unit], *, are_lines: bool, answer: tuple[int, str] | None = None
    ) -> list[Rejected]:
        """``answer``: what InfluxDB already said to exactly these units (not sent again)."""
        status, message = answer or self._send([chunk for _, chunk in units])
        if status in (200, 204):
            return []
        if status == 413:
            if len(units) > 1:
                mid = len(units) // 2
                return self._write_units(units[:mid], are_lines=are_lines) + self._write_units(
                    units[mid:], are_lines=are_lines
                )
            lines = units if are_lines else _lines_of(units)
            if len(lines) > 1:
                return self._write_units(lines, are_lines=True)
            return [Rejected(index, line, TOO_LARGE_REASON) for index, line in lines]
        # 400 or 422: only now are payloads cut into lines
        return self._isolate(units if are_lines else _lines_of(units), message)

    def _isolate(self, lines: list[_Unit], message: str) -> list[Rejected]:
        """Find the bad lines of a 400: by the server's own words, else by bisection."""
        core, partial, dropped = _unwrap(_name_victoriametrics_line(message))
        bad, all_named_matched = _match_named_lines(core, lines)
        if bad:
            rejected = [Rejected(*lines[p], bad[p]) for p in sorted(bad)]
            rest = [unit for p, unit in enumerate(lines) if p not in bad]
            if not rest or (all_named_matched and partial and dropped == 0):
                # InfluxDB 1.x: "partial write: unable to parse ..." with dropped=0 means every
                # line it did not name was written.
                return rejected
            return rejected + self._write_units(rest, are_lines=True)
        if not lines:
            return []
        if len(lines) > 1 and partial and dropped == len(lines) and _over_series_limit(core):
            return self._past_series_limit(lines, core)
        if len(lines) == 1:
            index, line = lines[0]
            return [Rejected(index, line, core or "HTTP 400")]
        mid = len(lines) // 2
        return self._write_units(lines[:mid], are_lines=True) + self._write_units(
            lines[mid:], are_lines=True
        )

    def _past_series_limit(self, lines: list[_Unit], core: str) -> list[Rejected]:
        """1.x ``partial write: max-series-per-database limit exceeded: (N) dropped=M`` names no
        line, and drops every new series of a write that would pass the limit; M was every
        line, so each is a new series. If the first alone is refused too, the database is full
        and every other one is refused as well (one more request, not a bisection down to
        single lines); otherwise there is room: the rest is bisected. Not a node failure."""
        first = self._write_units(lines[:1], are_lines=True)
        rest = lines[1:]
        if first and _over_series_limit(first[0].reason):
            return first + [Rejected(index, line, core) for index, line in rest]
        mid = (len(rest) + 1) // 2
        second = self._write_units(rest[mid:], are_lines=True) if rest[mid:] else []
        return first + self._write_units(rest[:mid], are_lines=True) + second

    # --- one request, retried over the nodes -----------------------------------------------

    def _send(self, chunks: Sequence[bytes]) -> tuple[int, str]:
        """POST the chunks; return (200|204|400|413|422, server message) or raise a SinkError."""
        target = self._target
        body = _join(chunks)
        content = body
        if target.compression == "gzip":
            content = gzip.compress(body, compresslevel=target.compression_level, mtime=0)
        self._credentials()  # unreadable: misconfigured before any node is tried
        with self._rr_lock:
            start = next(self._rr)
        failure: SinkUnavailable | None = None
        cause: BaseException | None = None
        for attempt in range(target.max_retries + 1):
            if attempt:
                self._sleep(self._backoff(attempt - 1))
            nodes = list(self._nodes())
            if not nodes:
                if failure is not None:
                    break  # raise the last failure: that is what went wrong
                raise SinkUnavailable(
                    f"{target.cluster}: no healthy node to write to", cluster=target.cluster
                )
            node = nodes[(start + attempt) % len(nodes)]
            shown = self._redact_url(node)
            try:
                resp = self._post(node, content)
            except httpx.TimeoutException as exc:
                failure = SinkTimeout(
                    f"{target.cluster}: no answer from {shown} within {target.timeout}s "
                    f"({type(exc).__name__})",
                    cluster=target.cluster,
                    node=shown,
                )
                cause = exc
            except httpx.TransportError as exc:
                tls = tls_failure(exc)
                if tls is not None:
                    failure = SinkTlsError(
                        f"{target.cluster}: {shown}: {tls}", cluster=target.cluster, node=shown
                    )
                    self._tls_failed(node, shown, tls)
                else:
                    failure = SinkUnavailable(
                        f"{target.cluster}: {shown} unreachable: {type(exc).__name__}: "
                        f"{self._scrub(str(exc))}",
                        cluster=target.cluster,
                        node=shown,
                    )
                cause = exc
            except httpx.InvalidURL as exc:
                raise SinkMisconfigured(
                    f"{target.cluster}: invalid node URL {shown}: {self._scrub(str(exc))}",
                    cluster=target.cluster,
                    node=shown,
                ) from exc
            else:
                status = resp.status_code
                message = _server_message(resp)
                if self._misconfigured(status, message):
                    self._report(node, True)
                    raise SinkMisconfigured(
                        f"{target.cluster}: {shown} refused the write with HTTP {status}: "
                        f"{self._scrub(message)[:_MESSAGE_LIMIT]}",
                        cluster=target.cluster,
                        node=shown,
                    )
                if status in (200, 204, 400, 413, 422):
                    self._report(node, True)
                    return status, message
                failure = SinkUnavailable(
                    f"{target.cluster}: {shown} answered HTTP {status}: "
                    f"{self._scrub(message)[:_MESSAGE_LIMIT]}",
                    cluster=target.cluster,
                    node=shown,
                )
                cause = None
            self._report(node, False)
            log.warning(
                "sink_node_failed",
                cluster=target.cluster,
                node=shown,
                attempt=attempt,
                error=type(failure).__name__,
                detail=str(failure),
            )
        assert failure is not None  # the loop ran at least once and did not return
        raise failure from cause

    def _post(self, node: str, content: bytes) -> httpx.Response:
        """One POST with the current credentials; a 401/403 is sent once more if the
        credentials changed while it was under way (a rotation between read and answer)."""
        url = node.rstrip("/") + self._path
        creds, auth = self._credentials()
        with self._client.client() as client:
            resp = client.post(
                url, params=self._params, content=content, auth=auth.auth, headers=auth.headers
            )
            if resp.status_code in (401, 403) and self._credentials()[0] != creds:
                resp.close()
                auth = self._credentials()[1]
                resp = client.post(
                    url, params=self._params, content=content, auth=auth.auth, headers=auth.headers
                )
        return resp

    def _misconfigured(self, status: int, message: str) -> bool:
        if status in (401, 403):
            return True
        if status < 400 or status == 413 or message.startswith(_ABOUT_LINES):
            return False  # a message about lines quotes them: never read meaning into data
        if _NOT_FOUND.search(message):
            return True  # 404 database/bucket/org not found; 1.x: 500 retention policy not found
        return status == 400 and _REQUEST_LEVEL_400.search(message) is not None

    def _report(self, node: str, ok: bool) -> None:
        if ok and self._tls_failing:
            self._tls_failing.pop(node, None)
        if self._on_node_result is not None:
            self._on_node_result(node, ok)

    def _tls_failed(self, node: str, shown: str, reason: str) -> None:
        """One ``tls_error`` event per node and reason, until the node answers again."""
        if self._tls_failing.get(node) == reason:
            return
        self._tls_failing[node] = reason
        log.error(
            "tls_error",
            cluster=self._target.cluster,
            node=shown,
            reason=reason,
            hint=f"check clusters.{self._target.cluster}.tls and the node's certificate",
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return scrub(text)

    def _redact_url(self, url: str) -> str:
        """The node URL without user:password@, and with no secret left in it."""
        try:
            parts = urlsplit(url)
        except ValueError:
            return self._scrub(url)
        if "@" in parts.netloc:
            parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
        return self._scrub(urlunsplit(parts))


# --- pure helpers ---------------------------------------------------------------------------


def _join(chunks: Sequence[bytes]) -> bytes:
    """One body of payloads/lines, each followed by a newline. A payload that already ends in
    one leaves a blank line, which every server skips (cheaper than looking at each payload)."""
    return b"\n".join(chunks) + b"\n" if chunks else b""


def _server_message(resp: httpx.Response) -> str:
    """InfluxDB's error text: v1 ``{"error": ...}``, v2 ``{"message": ...}``, else the body."""
    text = resp.text
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("error", "message"):
            value = doc.get(key)
            if isinstance(value, str):
                return value.removeprefix(_V2_WRITE_FAILURE)
    return text.strip() or resp.headers.get("X-Influxdb-Error", "")


def split_lines(payload: bytes) -> list[bytes]:
    """Cut a payload into lines the way InfluxDB 1.x does (``models.scanLine``).

    A newline inside a quoted string field value, or right after a backslash, does not end
    the line. Blank lines and comments are kept here (see ``_lines_of``).
    """
    if b'"' not in payload and b"\\" not in payload:
        return payload.split(b"\n")
    lines: list[bytes] = []
    start = 0
    skip_to = 0
    quoted = fields = False
    equals = commas = 0
    n = len(payload)
    for match in _LP_SPECIAL.finditer(payload):
        i = match.start()
        if i < skip_to:
            continue
        char = payload[i]
        if char == 0x5C:  # backslash escapes the next byte
            if i + 2 < n:
                skip_to = i + 2
            continue
        if char == 0x20:
            fields = True
        if fields:
            if not quoted and char == 0x3D:  # =
                equals += 1
                continue
            if not quoted and char == 0x2C:  # ,
                commas += 1
                continue
            if char == 0x22 and equals > commas:  # "
                quoted = not quoted
                continue
        if char == 0x0A and not quoted:
            lines.append(payload[start:i])
            start = i + 1
            quoted = fields = False
            equals = commas = 0
    lines.append(payload[start:])
    return lines


def _lines_of(units: list[_Unit]) -> list[_Unit]:
    """Every line of every payload, keeping its payload index; no blank or comment lines."""
    lines: list[_Unit] = []
    for index, payload in units:
        for line in split_lines(payload):
            stripped = line.lstrip(_WHITESPACE)
            if stripped and not stripped.startswith(b"#"):
                lines.append((index, line))
    return lines


def _over_series_limit(reason: str) -> bool:
    """InfluxDB 1.x's words for a write past ``max-series-per-database``."""
    return reason.startswith(SERIES_LIMIT_REASON)


def _unwrap(message: str) -> tuple[str, bool, int | None]:
    """Strip 1.x's ``partial write: `` prefix and `` dropped=N`` suffix: (core, partial, N)."""
    partial = message.startswith(_PARTIAL_PREFIX)
    core = message[len(_PARTIAL_PREFIX) :] if partial else message
    dropped: int | None = None
    found = _DROPPED_SUFFIX.search(core)
    if found is not None:
        dropped = int(found.group(1))
        core = core[: found.start()]
    return core, partial, dropped


def _name_victoriametrics_line(message: str) -> str:
    """VictoriaMetrics' 400 for a bad line, as 1.x's ``unable to parse '<line>': <why>``.

    It quotes (Go's ``%q``) everything from the bad line to the end of the request; the bad
    line is the quoted text up to its first newline, and nothing of the request was written
    (so no ``partial write:``). Any other message, or one this cannot read (an invalid UTF-8
    byte, ``\\x..``; no closing quote), is returned as it is: the lines are then found by
    bisection.
    """
    if not message.startswith(_VM_PARSE_PREFIX):
        return message
    quoted = _GO_STRING.match(message, len(_VM_PARSE_PREFIX))
    if quoted is None or not message.startswith(": ", quoted.end()):
        return message
    line: list[str] = []
    for token in _GO_TOKEN.finditer(quoted.group(1)):
        escape = token.group(1)
        if escape is None:
            line.append(token.group(0))
            continue
        if escape[0] in "uU":
            decoded = chr(int(escape[1:], 16))
        elif escape in _GO_ESCAPES:
            decoded = _GO_ESCAPES[escape]
        else:
            return message  # \x..: a byte of the request that is not UTF-8
        if decoded == "\n":
            break
        line.append(decoded)
    why = _VM_SEE_ALSO.sub("", message[quoted.end() + 2 :])
    named = "".join(line).lstrip(_WHITESPACE.decode())
    return f"{_PARSE_PREFIX}{named}': {why}"


def _match_named_lines(core: str, lines: list[_Unit]) -> tuple[dict[int, str], bool]:
    """Map the lines a ``unable to parse '<line>': <why>`` list names to positions in ``lines``.

    Returns ({position: reason}, whether every named line was found). A named text that is not
    exactly one of our lines (truncated, re-encoded, or cut differently) is not guessed at.
    """
    if not core.startswith(_PARSE_PREFIX):
        return {}, False
    by_text: dict[str, list[int]] = {}
    for position, (_, line) in enumerate(lines):
        try:
            key = line.lstrip(_WHITESPACE).decode("utf-8")
        except UnicodeDecodeError:
            continue  # the server shows invalid UTF-8 as U+FFFD: leave it to bisection
        by_text.setdefault(key, []).append(position)
    bad: dict[int, str] = {}
    all_matched = True
    for entry in _ENTRY_SEPARATOR.split(core):
        named = entry[len(_PARSE_PREFIX) :]
        end = named.rfind("': ")
        while end >= 0 and named[:end] not in by_text:
            end = named.rfind("': ", 0, end)
        if end < 0:
            all_matched = False
            continue
        for position in by_text[named[:end]]:
            bad[position] = entry
    return bad, all_matched

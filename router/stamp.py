"""Give line-protocol lines without a timestamp their Kafka message's timestamp.

InfluxDB stamps a line that has no timestamp with its own clock when the line arrives, so every
re-send of such a line (a replay after a failover, a retry after a lost answer, the bisection of
a partial write) would store a new point. Stamped with the time of the Kafka message that carries
it (CreateTime or LogAppendTime, which never changes), a re-sent point overwrites itself.

Line protocol: ``measurement[,tags] fields [timestamp]``. The field set always contains ``=``
and a string field value ends with ``"``, so a line has a timestamp iff its last space-separated
token is all digits, optionally after a ``-``. Trailing spaces are ignored (InfluxDB accepts
them); a tab or a carriage return is not a separator for InfluxDB (it refuses such a line anyway).
Blank lines and ``#`` comments are left alone. A newline inside a quoted string field value, or
right after a backslash, does not end a line (``router.sink.split_lines``, InfluxDB's scanner).

``lacks_timestamp`` is the cheap test run for every message (no copy, no allocation per line,
for a message whose lines all have timestamps): with a single line it looks at the last token;
with several it scans the reversed payload once for a line end not preceded by ``<space>digits``.
That test reads every ``\\n`` as a line end, which is conservative: a real line end is always
among them, and one preceded by ``<space>digits`` ends in a timestamp. Only when it says "maybe"
does ``stamp_lines`` cut real lines and append `` <ts>`` to those without one
(``stamp_missing`` is both steps).
"""

from __future__ import annotations

import re
from typing import Literal

from router.sink import split_lines

__all__ = [
    "NO_TIMESTAMP",
    "Precision",
    "kafka_time",
    "lacks_timestamp",
    "stamp_lines",
    "stamp_missing",
]

Precision = Literal["ns", "us", "ms", "s"]

# In the reversed payload: a line end (its "\n") not followed by digits, an optional "-" and a
# space, i.e. in the original text a line that does not end in " [-]digits"; a blank line
# (another "\n") needs no timestamp either (the hot path joins messages ending in one).
_UNSTAMPED_END = re.compile(rb"\n(?![0-9]+-? |\n)")
_STAMPED_TAIL = re.compile(rb"[0-9]+-? ")  # the reversed end of the payload's last line
_LEADING_WHITESPACE = b" \t\x00"  # what InfluxDB skips at the start of a line

_PER_MS = {"ns": 1_000_000, "us": 1_000, "ms": 1}
NO_TIMESTAMP = 0  # confluent_kafka.TIMESTAMP_NOT_AVAILABLE (1: CreateTime, 2: LogAppendTime)


def kafka_time(timestamp: tuple[int, int], precision: Precision) -> int | None:
    """A Kafka message's ``timestamp()`` (type, milliseconds since the epoch) in ``precision``
    units (``s`` rounds down); None when the message has none (type 0, not available)."""
    kind, ms = timestamp
    if kind == NO_TIMESTAMP:
        return None
    if precision == "s":
        return ms // 1000
    return ms * _PER_MS[precision]


def lacks_timestamp(payload: bytes) -> bool:
    """Whether some line of ``payload`` may lack a timestamp (False: every line has one)."""
    end = len(payload)
    newline = payload.find(b"\n")
    if newline < 0 or newline == end - 1:  # one line, with or without its newline
        if newline >= 0:
            end = newline
        token = payload[payload.rfind(b" ", 0, end) + 1 : end]
        return not (token.isdigit() or (token[:1] == b"-" and token[1:].isdigit()))
    reverse = payload[::-1]
    if _UNSTAMPED_END.search(reverse) is not None:
        return True
    return not payload.endswith(b"\n") and _STAMPED_TAIL.match(reverse) is None


def stamp_missing(payload: bytes, ts: int) -> bytes:
    """``payload`` with `` <ts>`` after every line that has no timestamp; ``ts`` is already in
    the destination's precision. Returns ``payload`` itself when every line has one."""
    return stamp_lines(payload, ts) if lacks_timestamp(payload) else payload


def stamp_lines(payload: bytes, ts: int) -> bytes:
    """``stamp_missing`` without the quick test (for a payload ``lacks_timestamp`` flagged)."""
    stamp = b" %d" % ts
    lines = split_lines(payload)
    changed = False
    for i, line in enumerate(lines):
        body = line.rstrip(b" ")
        space = body.rfind(b" ")
        if space < 0:
            continue  # blank, or no field set (InfluxDB refuses it): left as it is
        token = body[space + 1 :]
        if token.isdigit() or (token[:1] == b"-" and token[1:].isdigit()):
            continue
        if body.endswith(b"\r"):
            continue  # CRLF: InfluxDB refuses the line, its dead letter shows it as sent
        if body.lstrip(_LEADING_WHITESPACE)[:1] == b"#":
            continue
        lines[i] = body + stamp + line[len(body) :]
        changed = True
    return b"\n".join(lines) if changed else payload

"""Guard a route's clusters from bad metrics: block rules and a series-cardinality guard.

One producer that puts a timestamp or a request id into a metric name or tag creates a new
series per point, and a few hundred thousand of those take an InfluxDB down (the series index
grows, then ``max-series-per-database`` refuses every batch that holds one). A ``Guard`` looks
at the series key of every line of a route (``measurement[,tag=value...]``, InfluxDB's scanner
rules: a backslash escapes the next byte) before the line is batched, and refuses a line

- that a **block rule** matches (measurement regex, tag key regex, optionally the value of that
  tag by regex; every given condition must hold): reason ``blocked:<rule>``;
- that would create a **new series** over a limit: more than ``max_series`` series in its
  measurement, more than ``max_new_series_per_minute`` new series of its measurement (a token
  bucket of that many tokens, refilled at that rate per minute), more than
  ``max_tracked_series`` in the route, or a measurement beyond ``max_measurements``:
  reason ``cardinality:<measurement>``. Series already known keep flowing.

Refused lines go to the dead letters with that reason; the rest of the message is written.

Pure: no I/O; the clock is injected. One ``Guard`` per route and process, shared by the route's
destinations (so a standby that takes over, or a primary that replays, finds the series the
route already let through); every consumer thread of the route calls ``known`` per message,
and ``check`` (the lines to write, the refused ones) when it answers no.

The hot path (every line of a known series) is the raw series key of each line, hashed, looked
up in ``_cache``, a set of the hashes of series keys already let through: no lock, no parsing,
no allocation beyond the keys (one ``split``, one ``partition`` per line). It is read without
the lock: with CPython's GIL a set lookup is atomic, and the cache only ever holds keys that
were decided "pass" (the slow path, under the lock, decides everything else). A key cut at an
escaped space (``my\\ cpu``) ends in an unpaired backslash, which no exact key does, so it never
hits the cache: the line takes the slow path, which parses it exactly. A line with leading
whitespace has an empty key (hash 0, never cached): the slow path too.

State and its memory: per measurement a dict {series hash: generation parity} plus a token
bucket; one cache set over the route. A series costs about 110 bytes while tracked (one 64-bit
hash object shared by the dict and the cache, a dict entry and a set slot), so the route's
memory is at most about ``max_tracked_series`` x 110 bytes plus ``max_measurements`` x 500
bytes. With block rules alone nothing is counted: the cache holds at most ``_PASS_CACHE`` keys
(an arbitrary one makes room for a new one) and the blocked keys at most ``_BLOCKED_CACHE``
(emptied when full): past them only speed is lost.

Generations: every ``series_ttl / 2`` (checked on the slow path and by ``stats``, which every
metrics scrape calls) the cache is emptied and the series not seen during the generation that
ends are forgotten (so a series with no line for ``series_ttl`` is forgotten, one silent for
half of it may be); the active ones are re-marked on their next line.
The first ``warmup`` after a guard is built the rate limit is not applied (every series is
"new" after a restart); ``max_series`` and the caps are.
"""

from __future__ import annotations

import heapq
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.sink import split_lines

if TYPE_CHECKING:
    from router.topology import GuardConfig

__all__ = [
    "BLOCKED",
    "CARDINALITY",
    "BlockRule",
    "Guard",
    "GuardStats",
    "Guards",
    "Limits",
    "MeasurementStats",
    "build_guard",
]

BLOCKED = "blocked:"
CARDINALITY = "cardinality:"

_WHITESPACE = b" \t\x00"  # what InfluxDB skips at the start of a line
_BLOCKED_CACHE = 65_536  # series keys remembered as blocked (cleared when full): <= ~5 MB
_PASS_CACHE = 262_144  # series keys let through by block rules alone: at most ~17 MB
_NOTHING: tuple[tuple[bytes, str], ...] = ()
# the series key of a line: up to the first space not escaped by a backslash
_KEY = re.compile(rb"[ \t\x00]*((?:[^ \\]|\\.)*)", re.S)
_MEASUREMENT_ESCAPES = re.compile(rb"\\([, ])")
_TAG_ESCAPES = re.compile(rb"\\([,= ])")

Refused = tuple[bytes, str]  # (line, reason)


@dataclass(frozen=True)
class BlockRule:
    """Refuse a line whose measurement matches ``measurement`` and that has a tag whose key
    matches ``tag_key`` (and whose value matches ``tag_value``); ``None`` matches anything.
    Patterns are searched (``re.search``): anchor them (``^cpu$``) for an exact name."""

    name: str
    measurement: re.Pattern[str] | None = None
    tag_key: re.Pattern[str] | None = None
    tag_value: re.Pattern[str] | None = None

    def matches(self, measurement: str, tags: Sequence[tuple[str, str]]) -> bool:
        if self.measurement is not None and self.measurement.search(measurement) is None:
            return False
        if self.tag_key is None:
            return True
        key, value = self.tag_key, self.tag_value
        return any(
            key.search(k) is not None and (value is None or value.search(v) is not None)
            for k, v in tags
        )


@dataclass(frozen=True)
class Limits:
    """The cardinality guard's settings (``None``: no such limit)."""

    max_new_series_per_minute: int | None = None
    max_series: int | None = None  # per measurement
    max_tracked_series: int = 1_000_000  # per route: bounds memory; new series beyond: refused
    max_measurements: int = 10_000  # per route
    series_ttl: float = 3600.0  # a series with no line for this long is forgotten
    warmup: float = 600.0  # after the guard is built, the rate limit is not applied


@dataclass(frozen=True)
class MeasurementStats:
    name: str
    series: int  # tracked now
    new_series: int  # let through as new since the guard was built
    refused: int  # lines refused for cardinality
    last_refused: float  # seconds since the last line refused; -1 when never


@dataclass(frozen=True)
class GuardStats:
    """A snapshot for the status page and the metrics."""

    blocked: Mapping[str, int]  # rule -> lines refused
    refused: int  # lines refused by the cardinality guard
    new_series: int
    series: int  # tracked now, over every measurement
    measurements: int
    warming_up: bool
    limited: int = 0  # measurements that had a line refused in the last minute
    top_refused: tuple[MeasurementStats, ...] = ()  # most lines refused first
    top_series: tuple[MeasurementStats, ...] = ()  # most series first


@dataclass
class _Measurement:
    name: str
    tokens: float
    refilled: float  # clock time of the last refill
    seen: dict[int, int] = field(default_factory=dict)  # series hash -> generation parity
    new_series: int = 0
    refused: int = 0
    last_refused: float = float("-inf")


class Guard:
    """The block rules and cardinality limits of one route (see the module docstring)."""

    def __init__(
        self,
        rules: Sequence[BlockRule] = (),
        limits: Limits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        config: object = None,
    ) -> None:
        self.config = config  # what the guard was built from (``Guards`` compares it)
        self._rules = tuple(rules)
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        # --- read by every consumer thread without the lock ---
        self._cache: set[int] = set()  # hashes of raw series keys decided "pass"
        # --- under the lock ---
        self._blocked: dict[int, str] = {}  # raw series key hash -> rule
        self._blocked_lines = dict.fromkeys((r.name for r in self._rules), 0)
        self._measures: dict[str, _Measurement] = {}
        self._parity = 0
        self._series = 0
        self._new_series = 0
        self._refused = 0
        ttl = limits.series_ttl if limits is not None else 3600.0
        self._period = ttl / 2
        self._rotate_at = now + self._period
        self._learn_until = now + (limits.warmup if limits is not None else 0.0)
        self._cache_cap = limits.max_tracked_series * 2 if limits is not None else _PASS_CACHE

    # --- the data path ------------------------------------------------------------------

    def known(self, payload: bytes) -> bool:
        """Whether every line of ``payload`` belongs to a series already let through (then
        ``check`` would return it as it is). The hot path: no lock, no parsing."""
        cut = payload.find(b" ")
        if payload.find(b"\n", cut, -1) < 0:  # one line (a last newline aside)
            return hash(payload[:cut]) in self._cache
        keys = [line.partition(b" ")[0] for line in payload.split(b"\n")]
        if not keys[-1]:
            keys.pop()  # the payload's last newline
        return self._cache.issuperset(map(hash, keys))

    def check(self, payload: bytes) -> tuple[bytes, Sequence[Refused]]:
        """(what to write, the refused lines with their reasons) for one message. Returns
        ``payload`` itself and no refusal when every line belongs to a series let through."""
        if self.known(payload):
            return payload, _NOTHING
        return self._check_lines(payload)

    def _check_lines(self, payload: bytes) -> tuple[bytes, Sequence[Refused]]:
        """The slow path: every line parsed exactly and judged, under the lock."""
        lines = split_lines(payload)
        kept: list[bytes] = []
        refused: list[Refused] = []
        with self._lock:
            now = self._clock()
            if now >= self._rotate_at:
                self._rotate(now)
            for line in lines:
                why = self._judge(line, now)
                if why:
                    refused.append((line, why))
                else:
                    kept.append(line)
        if not refused:
            return payload, _NOTHING
        return b"\n".join(k for k in kept if k.strip(_WHITESPACE)), refused

    def _judge(self, line: bytes, now: float) -> str:
        """Why ``line`` is refused; "" when it passes. Under the lock."""
        key = _series_key(line)
        if not key:
            return ""  # blank, a comment, or no field set: InfluxDB says what it thinks
        h = hash(key)
        if h in self._cache:
            return ""
        rule = self._blocked.get(h)
        if rule is not None:
            self._blocked_lines[rule] += 1
            return BLOCKED + rule
        why = self._decide(h, key, now)
        if not why and h:
            if len(self._cache) >= self._cache_cap:
                self._cache.pop()  # an arbitrary key makes room: a miss costs the slow path
            self._cache.add(h)
        return why

    def _decide(self, h: int, key: bytes, now: float) -> str:
        """The block rules, then the limits, for a series key not in the cache."""
        parsed = _parse_key(key)
        if parsed is None:
            return ""  # not a series key InfluxDB accepts: its own answer dead-letters it
        measurement, tags, canonical = parsed
        for rule in self._rules:
            if rule.matches(measurement, tags):
                if len(self._blocked) >= _BLOCKED_CACHE:
                    self._blocked = {}
                self._blocked[h] = rule.name
                self._blocked_lines[rule.name] += 1
                return BLOCKED + rule.name
        if self._limits is None:
            return ""
        return self._admit(measurement, h if canonical == key else hash(canonical), now)

    def _admit(self, name: str, series: int, now: float) -> str:
        """Count ``series`` of measurement ``name``; why it is refused, "" if it may pass."""
        limits = self._limits
        assert limits is not None
        rate = limits.max_new_series_per_minute
        m = self._measures.get(name)
        if m is None:
            if len(self._measures) >= limits.max_measurements:
                self._refused += 1
                return CARDINALITY + name
            m = _Measurement(name, tokens=float(rate or 0), refilled=now)
            self._measures[name] = m
        seen = m.seen
        if series in seen:
            seen[series] = self._parity  # seen in this generation
            return ""
        if (limits.max_series is not None and len(seen) >= limits.max_series) or (
            self._series >= limits.max_tracked_series
        ):
            return self._refuse(m, now)
        if rate is not None and now >= self._learn_until:
            m.tokens = min(float(rate), m.tokens + (now - m.refilled) * rate / 60.0)
            m.refilled = now
            if m.tokens < 1.0:
                return self._refuse(m, now)
            m.tokens -= 1.0
        seen[series] = self._parity
        m.new_series += 1
        self._series += 1
        self._new_series += 1
        return ""

    def _refuse(self, m: _Measurement, now: float) -> str:
        m.refused += 1
        m.last_refused = now
        self._refused += 1
        return CARDINALITY + m.name

    def _rotate(self, now: float) -> None:
        """A generation ends: forget the series not seen during it, empty the cache (the
        active series are re-marked on their next line), drop idle measurements."""
        self._rotate_at = now + self._period
        ended = self._parity
        self._parity ^= 1
        self._cache = set()
        total = 0
        for name, m in list(self._measures.items()):
            m.seen = {h: p for h, p in m.seen.items() if p == ended}
            total += len(m.seen)
            if not m.seen and now - m.last_refused > self._period:
                del self._measures[name]
        self._series = total

    # --- observation --------------------------------------------------------------------

    def stats(self, top: int = 10) -> GuardStats:
        """Counters and the top offenders (status page, metrics). Takes the lock briefly."""
        with self._lock:
            now = self._clock()
            if now >= self._rotate_at:
                self._rotate(now)
            measures = list(self._measures.values())
            blocked = dict(self._blocked_lines)
            refused, new, series = self._refused, self._new_series, self._series
            limits = self._limits
            warming = (
                limits is not None
                and limits.max_new_series_per_minute is not None
                and now < self._learn_until
            )
            shown = [
                MeasurementStats(
                    m.name,
                    len(m.seen),
                    m.new_series,
                    m.refused,
                    round(now - m.last_refused, 1) if m.refused else -1.0,
                )
                for m in measures
            ]
        return GuardStats(
            blocked=blocked,
            refused=refused,
            new_series=new,
            series=series,
            measurements=len(measures),
            warming_up=warming,
            limited=sum(1 for s in shown if 0 <= s.last_refused <= 60),
            top_refused=tuple(
                heapq.nlargest(top, (s for s in shown if s.refused), key=lambda s: s.refused)
            ),
            top_series=tuple(heapq.nlargest(top, shown, key=lambda s: s.series)),
        )


def _series_key(line: bytes) -> bytes:
    """The series key of a line as written (leading whitespace skipped); b"" for a blank
    line, a comment, or a line without a field set."""
    match = _KEY.match(line)
    assert match is not None  # the pattern matches the empty string too
    key = match.group(1)
    if not key or key[0] == 0x23 or not line[match.end() :].strip(b" "):
        return b""
    return key


def _split_unescaped(data: bytes, sep: int) -> list[bytes]:
    """``data`` cut at every ``sep`` byte that no backslash escapes."""
    parts: list[bytes] = []
    start = i = 0
    n = len(data)
    while i < n:
        char = data[i]
        if char == 0x5C:  # a backslash escapes the next byte
            i += 2
            continue
        if char == sep:
            parts.append(data[start:i])
            start = i + 1
        i += 1
    parts.append(data[start:])
    return parts


def _text(raw: bytes, escapes: re.Pattern[bytes]) -> str:
    """A name as InfluxDB stores it: its escapes removed, as text."""
    if b"\\" in raw:
        raw = escapes.sub(rb"\1", raw)
    return raw.decode("utf-8", "replace")


def _parse_key(key: bytes) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """(measurement, [(tag key, tag value)], canonical key: tags sorted) of a series key as
    written, or None when InfluxDB would refuse it (no measurement, a tag without key or
    value)."""
    escaped = b"\\" in key
    parts = _split_unescaped(key, 0x2C) if escaped else key.split(b",")
    name = parts[0]
    if not name:
        return None
    pairs: list[tuple[bytes, bytes]] = []
    for tag in parts[1:]:
        if escaped:
            kv = _split_unescaped(tag, 0x3D)
            k, v = kv[0], b"=".join(kv[1:]) if len(kv) > 1 else b""
        else:
            k, _, v = tag.partition(b"=")
        if not k or not v:
            return None
        pairs.append((k, v))
    ordered = sorted(pairs)
    canonical = key if ordered == pairs else b",".join([name, *(k + b"=" + v for k, v in ordered)])
    tags = [(_text(k, _TAG_ESCAPES), _text(v, _TAG_ESCAPES)) for k, v in pairs]
    return _text(name, _MEASUREMENT_ESCAPES), tags, canonical


# --- from the topology ----------------------------------------------------------------------


def build_guard(config: GuardConfig, *, clock: Callable[[], float] = time.monotonic) -> Guard:
    """The guard a route's ``guard:`` section describes (already validated)."""
    rules = [
        BlockRule(
            name=rule.name,
            measurement=re.compile(rule.measurement) if rule.measurement is not None else None,
            tag_key=re.compile(rule.tag.key) if rule.tag is not None else None,
            tag_value=re.compile(rule.tag.value)
            if rule.tag is not None and rule.tag.value is not None
            else None,
        )
        for rule in config.block
    ]
    limits = None
    if config.max_new_series_per_minute is not None or config.max_series is not None:
        limits = Limits(
            max_new_series_per_minute=config.max_new_series_per_minute,
            max_series=config.max_series,
            max_tracked_series=config.max_tracked_series,
            max_measurements=config.max_measurements,
            series_ttl=config.series_ttl,
            warmup=config.warmup,
        )
    return Guard(rules, limits, clock=clock, config=config)


class Guards:
    """The guard of every route of this process, shared by the route's destinations.

    A route rebuilt with the same ``guard:`` section keeps its guard (and what it learned) as
    long as a destination of the route holds it; a changed section gets a new one. Guards are
    held weakly: a removed route's guard goes with its last destination.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_route: weakref.WeakValueDictionary[str, Guard] = weakref.WeakValueDictionary()

    def get(self, route: str, config: GuardConfig | None) -> Guard | None:
        if config is None:
            return None
        with self._lock:
            guard = self._by_route.get(route)
            if guard is None or guard.config != config:
                guard = build_guard(config)
                self._by_route[route] = guard
            return guard

    def stats(self) -> dict[str, GuardStats]:
        with self._lock:
            guards = dict(self._by_route.items())
        return {route: guard.stats() for route, guard in sorted(guards.items())}

    def status(self) -> dict[str, object]:
        """``/api/status``'s ``guards``: per route, counters and top offenders."""
        return {route: stats_json(st) for route, st in self.stats().items()}


def stats_json(st: GuardStats) -> dict[str, object]:
    def rows(items: Iterable[MeasurementStats]) -> list[dict[str, object]]:
        return [
            {
                "measurement": s.name,
                "series": s.series,
                "new_series": s.new_series,
                "refused": s.refused,
                "last_refused_ago": s.last_refused if s.refused else None,
            }
            for s in items
        ]

    return {
        "blocked": dict(st.blocked),
        "refused": st.refused,
        "new_series": st.new_series,
        "series": st.series,
        "measurements": st.measurements,
        "warming_up": st.warming_up,
        "limited": st.limited,
        "top_refused": rows(st.top_refused),
        "top_series": rows(st.top_series),
    }

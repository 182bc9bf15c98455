"""Graphite plaintext -> InfluxDB line protocol, with InfluxDB 1.x graphite templates.

A route with ``format: graphite`` carries lines ``<metric.path> <value> [<timestamp>]``. Its
``graphite_templates`` say how a path becomes a measurement, tags and a field, as in InfluxDB
1.x's graphite input (and Telegraf's graphite parser):

    [filter] template [tag1=v1,tag2=v2]

    filter    dot sections matched against the path; a section is a word or ``*`` (any one
              section). A filter matches a path that starts with it. No filter: the default.
    template  dot parts, applied to the path's sections by position:
              measurement    this section is part of the measurement (several are joined by ".")
              measurement*   the rest of the path is part of the measurement
              field          this section is part of the field name (several are joined by
                             ".", as in Telegraf; InfluxDB 1.x refuses such lines)
              field*         the rest of the path is part of the field name
              (empty)        skip this section
              any other word a tag key; the section is its value (a key given twice joins
                             its values with ".")
    tags      extra tags for every point of this template

``servers.web01.cpu.load 0.5 1700000000`` with ``servers.* .host.measurement.field``:
``cpu,host=web01 load=0.5 1700000000000000000``.

Choosing a template: the most specific matching filter wins, section by section from the left:
an exact word beats ``*``, and a longer filter beats its own prefix (``a.b.c`` over ``a.b`` over
``a``). When a more specific branch leads nowhere, the next one is tried (``a.*.c`` is used for
``a.x.c`` even though ``a.x.d`` also exists). No filter matches: the entry without a filter, or
``measurement*`` (the whole path is the measurement).

Points: the field is ``value`` unless the template names one; the value is a finite float; the
timestamp is in seconds (fractions allowed) and written in nanoseconds; a missing timestamp or
``-1`` means ``default_ns``: the router passes the Kafka message's timestamp, so a re-sent line
overwrites its point (or the time of conversion when the route's ``stamp_missing_timestamps`` is
off). Tags are sorted by key. A tag taken from the path wins over an extra tag
of the same key; a tag with an empty value is left out; an empty measurement falls back to the
whole path (as InfluxDB does).

Where InfluxDB 1.x accepts a template and then does something surprising, ``parse_templates``
refuses it instead: anything after ``measurement*``/``field*`` (ignored by InfluxDB),
``measurement*`` with ``field*``, a tag key ``time``, a duplicate filter or tag key.

One bad line raises ``GraphiteError`` from ``convert_line``; ``convert`` reports it with the
reason and goes on with the other lines of the message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

__all__ = ["GraphiteConverter", "GraphiteError", "Template", "parse_templates"]

DEFAULT_FIELD = "value"
DEFAULT_TEMPLATE = "measurement*"
JOINER = "."  # InfluxDB's default ``separator``: joins measurement, field and repeated tag parts

_MEASUREMENT = "measurement"
_MEASUREMENT_REST = "measurement*"
_FIELD = "field"
_FIELD_REST = "field*"
_KEYWORDS = frozenset({_MEASUREMENT, _MEASUREMENT_REST, _FIELD, _FIELD_REST})

_NS_PER_S = 1_000_000_000
# InfluxDB's models.MinNanoTime / MaxNanoTime: the range a line-protocol timestamp may take.
_MIN_NS = -(2**63) + 2
_MAX_NS = 2**63 - 2
_MIN_S = Decimal(_MIN_NS).scaleb(-9)
_MAX_S = Decimal(_MAX_NS).scaleb(-9)

_CACHE_SIZE = 65_536  # rendered "measurement,tags field=" per metric path; cleared when full
_SHOW = 64  # at most this many characters of a bad token are quoted in a reason

_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})  # tag keys/values, field keys


class GraphiteError(ValueError):
    """A graphite line or template is invalid; the message says why.

    ``index`` is the position of the bad entry when ``parse_templates`` raised it, else None.
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        self.index = index
        super().__init__(message)


@dataclass(frozen=True)
class Template:
    """One parsed ``[filter] template [tags]`` entry.

    ``filter`` is "" for the default entry; ``parts`` are the template's dot parts ("" skips a
    section); ``tags`` are the extra tags, sorted by key.
    """

    filter: str
    parts: tuple[str, ...]
    tags: tuple[tuple[str, str], ...] = ()

    def apply(self, path: str) -> tuple[str, dict[str, str], str]:
        """(measurement, tags, field) of ``path``; empty measurement or field when none matched."""
        sections = path.split(".")
        measurement: list[str] = []
        field: list[str] = []
        tags: dict[str, list[str]] = {}
        for index, part in enumerate(self.parts[: len(sections)]):
            if part == _MEASUREMENT:
                measurement.append(sections[index])
            elif part == _FIELD:
                field.append(sections[index])
            elif part == _MEASUREMENT_REST:
                measurement += sections[index:]
            elif part == _FIELD_REST:
                field += sections[index:]
            elif part:
                tags.setdefault(part, []).append(sections[index])
        joined = dict(self.tags)
        joined.update((key, JOINER.join(values)) for key, values in tags.items())
        return JOINER.join(measurement), joined, JOINER.join(field)


# --- parsing templates -------------------------------------------------------------------------


def parse_templates(templates: Sequence[str]) -> list[Template]:
    """Parse ``[filter] template [tag=value,...]`` entries; GraphiteError names the first bad
    one (its ``index`` is the entry's position)."""
    parsed: list[Template] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(templates):
        try:
            template = _parse_entry(entry)
        except GraphiteError as exc:
            raise GraphiteError(f"template {entry!r}: {exc}", index=index) from None
        if template.filter in seen:
            what = f"filter {template.filter!r}" if template.filter else "default (no filter)"
            raise GraphiteError(
                f"template {entry!r}: duplicate {what}, also in entry {seen[template.filter]}",
                index=index,
            )
        seen[template.filter] = index
        parsed.append(template)
    return parsed


def _parse_entry(entry: str) -> Template:
    words = entry.split()
    if not words:
        raise GraphiteError("empty template")
    tags: tuple[tuple[str, str], ...] = ()
    if len(words) >= 2 and "=" in words[-1]:
        tags = _parse_tags(words.pop())
    if len(words) > 2:
        raise GraphiteError("expected '[filter] template [tag=value,...]'")
    filter_ = _check_filter(words[0]) if len(words) == 2 else ""
    return Template(filter_, _parse_parts(words[-1]), tags)


def _check_filter(filter_: str) -> str:
    for section in filter_.split("."):
        if not section:
            raise GraphiteError(f"filter {filter_!r} has an empty section")
        if "*" in section and section != "*":
            raise GraphiteError(
                f"filter {filter_!r}: '*' must be a whole section (like 'servers.*.cpu')"
            )
    return filter_


def _parse_parts(template: str) -> tuple[str, ...]:
    parts = tuple(template.split("."))
    rest = [part for part in parts if part in (_MEASUREMENT_REST, _FIELD_REST)]
    if _MEASUREMENT not in parts and _MEASUREMENT_REST not in parts:
        raise GraphiteError("no 'measurement' or 'measurement*' part")
    if len(rest) > 1:
        raise GraphiteError("use one of 'measurement*' and 'field*', once")
    if rest and parts[-1] != rest[0]:
        raise GraphiteError(f"nothing may follow {rest[0]!r}")
    for part in parts:
        if part in _KEYWORDS or not part:
            continue
        if "*" in part or "=" in part:
            raise GraphiteError(
                f"invalid part {part!r}: use measurement, measurement*, field, field*, "
                "a tag key or nothing; extra tags go after the template, separated by a space"
            )
        _check_tag_key(part)
    return parts


def _parse_tags(text: str) -> tuple[tuple[str, str], ...]:
    tags: dict[str, str] = {}
    for item in text.split(","):
        key, equals, value = item.partition("=")
        if not equals or not key or not value or "=" in value:
            raise GraphiteError(f"invalid tag {item!r}: use key=value[,key=value...]")
        _check_tag_key(key)
        if "\\" in value:
            raise GraphiteError(f"invalid tag {item!r}: a backslash is ambiguous in line protocol")
        if key in tags:
            raise GraphiteError(f"tag {key!r} given twice")
        tags[key] = value
    return tuple(sorted(tags.items()))


def _check_tag_key(key: str) -> None:
    if key == "time":
        raise GraphiteError("'time' is not a valid tag key in InfluxDB")
    if "\\" in key:
        raise GraphiteError(f"tag key {key!r}: a backslash is ambiguous in line protocol")


# --- choosing a template -----------------------------------------------------------------------


class _Node:
    """A filter section in the filter tree: exact children, a ``*`` child, a template if a
    filter ends here."""

    __slots__ = ("children", "template", "wildcard")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.wildcard: _Node | None = None
        self.template: Template | None = None

    def insert(self, sections: Sequence[str], template: Template) -> None:
        node = self
        for section in sections:
            if section == "*":
                node.wildcard = node.wildcard or _Node()
                node = node.wildcard
            else:
                node = node.children.setdefault(section, _Node())
        node.template = template

    def search(self, sections: Sequence[str], start: int) -> Template | None:
        """The most specific template for ``sections[start:]``: exact word, then ``*``, then a
        filter that ends here."""
        if start < len(sections):
            child = self.children.get(sections[start])
            if child is not None:
                found = child.search(sections, start + 1)
                if found is not None:
                    return found
            if self.wildcard is not None:
                found = self.wildcard.search(sections, start + 1)
                if found is not None:
                    return found
        return self.template


# --- converting lines --------------------------------------------------------------------------


class GraphiteConverter:
    """Converts graphite plaintext to line protocol with one route's templates.

    Templates are parsed once; the rendered ``measurement,tags field=`` prefix of each metric
    path is cached (up to ``_CACHE_SIZE`` paths), so a repeated path costs a dict lookup.
    """

    def __init__(self, templates: Sequence[str]) -> None:
        parsed = parse_templates(templates)
        self.templates: tuple[Template, ...] = tuple(parsed)
        self._root = _Node()
        self._default = Template("", (DEFAULT_TEMPLATE,))
        for template in parsed:
            if template.filter:
                self._root.insert(template.filter.split("."), template)
            else:
                self._default = template
        self._prefixes: dict[bytes, bytes] = {}

    def template_for(self, path: str) -> Template:
        """The template that applies to a metric path."""
        return self._root.search(path.split("."), 0) or self._default

    def convert_line(self, line: bytes, default_ns: int) -> bytes:
        """One graphite line -> one line-protocol line (ns timestamp; ``default_ns`` when the
        line has none or -1); GraphiteError if bad."""
        words = line.split()
        if len(words) == 3:
            path, value, timestamp = words
            ns = _timestamp_ns(timestamp, default_ns)
        elif len(words) == 2:
            path, value = words
            ns = default_ns
        else:
            raise GraphiteError(
                f"expected '<path> <value> [<timestamp>]', got {len(words)} field(s)"
            )
        prefix = self._prefixes.get(path)
        if prefix is None:
            prefix = self._prefix(path)
        return b"%b%b %d" % (prefix, _value(value), ns)

    def convert(self, payload: bytes, default_ns: int) -> tuple[bytes, list[tuple[bytes, str]]]:
        """A whole message -> (its good lines as line protocol joined by newlines, [(bad line,
        reason), ...]). Blank lines are ignored; a bad line does not stop the others."""
        good: list[bytes] = []
        bad: list[tuple[bytes, str]] = []
        for raw in payload.split(b"\n"):
            if not raw or raw.isspace():
                continue
            try:
                good.append(self.convert_line(raw, default_ns))
            except GraphiteError as exc:
                bad.append((raw.rstrip(b"\r"), str(exc)))
        return b"\n".join(good), bad

    def _prefix(self, raw_path: bytes) -> bytes:
        """Render and cache ``measurement,k=v,... field=`` for a metric path."""
        try:
            path = raw_path.decode()
        except UnicodeDecodeError:
            raise GraphiteError(f"metric path {_show(raw_path)} is not UTF-8") from None
        if "\\" in path:
            raise GraphiteError(
                f"metric path {_show(raw_path)}: a backslash is ambiguous in line protocol"
            )
        measurement, tags, field = self.template_for(path).apply(path)
        measurement = measurement or path
        field = field or DEFAULT_FIELD
        if measurement.startswith("#"):
            raise GraphiteError(
                f"measurement {measurement[:_SHOW]!r} starts with '#' (a line-protocol comment)"
            )
        if field == "time":
            raise GraphiteError(f"metric path {_show(raw_path)}: 'time' is not a valid field key")
        rendered = [measurement.translate(_MEASUREMENT_ESCAPES)]
        for key, value in sorted(tags.items()):
            if value:
                rendered.append(f",{key.translate(_KEY_ESCAPES)}={value.translate(_KEY_ESCAPES)}")
        rendered.append(f" {field.translate(_KEY_ESCAPES)}=")
        prefix = "".join(rendered).encode()
        if len(self._prefixes) >= _CACHE_SIZE:
            self._prefixes.clear()
        self._prefixes[raw_path] = prefix
        return prefix


def _value(token: bytes) -> bytes:
    """A finite float value, formatted for line protocol."""
    try:
        if b"_" in token:  # float() takes "1_000"; graphite (Go's ParseFloat) does not
            raise ValueError(token)
        value = float(token)
    except ValueError:
        raise GraphiteError(f"value {_show(token)} is not a number") from None
    if not math.isfinite(value):
        raise GraphiteError(f"value {_show(token)} is not finite (NaN and Inf are refused)")
    return repr(value).encode()


def _timestamp_ns(token: bytes, default_ns: int) -> int:
    """Unix seconds (fractions kept exactly, to the nanosecond) -> nanoseconds; -1 is
    ``default_ns``."""
    seconds: int | Decimal
    if b"_" in token:
        raise GraphiteError(f"timestamp {_show(token)} is not a number")
    try:
        seconds = int(token)
    except ValueError:
        try:
            seconds = Decimal(token.decode("ascii"))
        except (UnicodeDecodeError, InvalidOperation):
            raise GraphiteError(f"timestamp {_show(token)} is not a number") from None
        if not seconds.is_finite():
            raise GraphiteError(f"timestamp {_show(token)} is not finite") from None
    if seconds == -1:
        return default_ns
    if not _MIN_S <= seconds <= _MAX_S:
        raise GraphiteError(f"timestamp {_show(token)} is out of range (unix seconds expected)")
    return int(seconds * _NS_PER_S)


def _show(token: bytes) -> str:
    text = token.decode(errors="replace")
    return repr(text if len(text) <= _SHOW else text[:_SHOW] + "...")

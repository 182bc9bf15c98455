"""Graphite plaintext -> line protocol with InfluxDB 1.x templates: one behaviour per test."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

import router.graphite
from router.graphite import GraphiteConverter, GraphiteError, Template, parse_templates

NOW = 1_700_000_123_000_000_000
TS = b" 1700000000"
NS = b" 1700000000000000000"


def convert(templates: Sequence[str], line: bytes) -> bytes:
    return GraphiteConverter(templates).convert_line(line, NOW)


# --- templates -----------------------------------------------------------------------------------


def test_default_template_uses_the_whole_path_as_measurement() -> None:
    """With no matching template the whole path is the measurement and the field is 'value'."""
    assert convert(["cpu.* .host.measurement"], b"servers.web01.cpu.load 0.5" + TS) == (
        b"servers.web01.cpu.load value=0.5" + NS
    )


def test_entry_without_filter_is_the_default() -> None:
    """An entry without a filter applies to every path that no filter matches."""
    templates = ["stats.* .measurement", "region.host.measurement*"]
    assert convert(templates, b"eu.web01.cpu.load 1" + TS) == (
        b"cpu.load,host=web01,region=eu value=1.0" + NS
    )


def test_measurement_and_tag_parts() -> None:
    """'measurement' takes its section, a word makes a tag, an empty part skips a section."""
    assert convert([".host.resource.measurement"], b"servers.web01.cpu.load 2" + TS) == (
        b"load,host=web01,resource=cpu value=2.0" + NS
    )


def test_field_part_names_the_field() -> None:
    """'field' takes its section as the field name instead of 'value'."""
    assert convert([".host.measurement.field"], b"servers.web01.cpu.idle 97.5" + TS) == (
        b"cpu,host=web01 idle=97.5" + NS
    )


def test_measurement_star_takes_the_rest_of_the_path() -> None:
    """'measurement*' joins every remaining section into the measurement."""
    assert convert(["region.host.measurement*"], b"eu.web01.cpu.load.1m 3" + TS) == (
        b"cpu.load.1m,host=web01,region=eu value=3.0" + NS
    )


def test_field_star_takes_the_rest_of_the_path() -> None:
    """'field*' joins every remaining section into the field name."""
    assert convert(["host.measurement.field*"], b"web01.disk.sda.read_bytes 7" + TS) == (
        b"disk,host=web01 sda.read_bytes=7.0" + NS
    )


def test_several_measurement_parts_are_joined_with_dots() -> None:
    """Several 'measurement' parts are joined with '.', InfluxDB's default separator."""
    assert convert(
        [".host.measurement.cpu.measurement"], b"servers.web01.cpu.cpu0.user 4" + TS
    ) == (b"cpu.user,cpu=cpu0,host=web01 value=4.0" + NS)


def test_repeated_tag_key_joins_its_sections() -> None:
    """A tag key given twice gets its sections joined with '.'."""
    assert convert(["region.region.measurement*"], b"us.west.cpu.load 100" + TS) == (
        b"cpu.load,region=us.west value=100.0" + NS
    )


def test_template_longer_than_path_uses_what_is_there() -> None:
    """Template parts past the end of the path are ignored."""
    assert convert(["measurement.host.dc"], b"cpu.web01 1" + TS) == b"cpu,host=web01 value=1.0" + NS


def test_sections_past_the_template_are_dropped() -> None:
    """Path sections past the end of a template without '*' are not used."""
    assert convert(["measurement.host"], b"cpu.web01.extra.bits 1" + TS) == (
        b"cpu,host=web01 value=1.0" + NS
    )


def test_empty_measurement_falls_back_to_the_path() -> None:
    """When the template's measurement parts get no section, the whole path is the measurement."""
    assert convert(["host.measurement"], b"web01 1" + TS) == b"web01,host=web01 value=1.0" + NS


def test_empty_tag_value_is_left_out() -> None:
    """A tag whose section is empty (``a..b``) is not written: line protocol has no empty tags."""
    assert convert(["measurement.host.dc"], b"cpu..dc1 1" + TS) == b"cpu,dc=dc1 value=1.0" + NS


# --- filters -------------------------------------------------------------------------------------


def test_filter_wildcard_matches_any_one_section() -> None:
    """A '*' section in a filter matches any one section of the path."""
    templates = ["*.web01.* measurement.host.field"]
    assert convert(templates, b"cpu.web01.idle 1" + TS) == b"cpu,host=web01 idle=1.0" + NS
    assert convert(templates, b"cpu.web02.idle 1" + TS) == b"cpu.web02.idle value=1.0" + NS


def test_filter_matches_paths_that_start_with_it() -> None:
    """A filter matches a longer path that starts with it."""
    assert convert(["stats measurement.host.measurement*"], b"stats.web01.cpu.load 1" + TS) == (
        b"stats.cpu.load,host=web01 value=1.0" + NS
    )


def test_filter_longer_than_path_does_not_match() -> None:
    """A filter with more sections than the path does not match it."""
    assert convert(["cpu.*.* measurement.host.field"], b"cpu.web01 1" + TS) == (
        b"cpu.web01 value=1.0" + NS
    )


def test_exact_section_beats_wildcard() -> None:
    """Where an exact word and '*' both match a section, the exact word wins."""
    templates = ["servers.* .measurement", "servers.db01 .host.measurement*"]
    assert convert(templates, b"servers.db01.cpu 1" + TS) == b"cpu,host=db01 value=1.0" + NS
    assert convert(templates, b"servers.web01.cpu 1" + TS) == b"web01 value=1.0" + NS


def test_longer_filter_beats_its_prefix() -> None:
    """A filter that matches more sections beats a shorter one that also matches."""
    templates = ["servers measurement*", "servers.*.cpu .host.measurement.field"]
    assert convert(templates, b"servers.web01.cpu.idle 1" + TS) == b"cpu,host=web01 idle=1.0" + NS
    assert convert(templates, b"servers.web01.mem.free 1" + TS) == (
        b"servers.web01.mem.free value=1.0" + NS
    )


def test_dead_end_exact_branch_falls_back_to_wildcard() -> None:
    """When the exact-word branch has no filter for the path, the '*' branch is tried next."""
    templates = ["a.b.c measurement.x.y", "a.*.d .x.measurement"]
    assert convert(templates, b"a.b.d 1" + TS) == b"d,x=b value=1.0" + NS


def test_dead_end_branch_falls_back_to_shorter_filter() -> None:
    """When no longer filter matches, a shorter filter on the same path still applies."""
    templates = ["a .host.measurement*", "a.*.c .measurement.x"]
    assert convert(templates, b"a.b.x.y 1" + TS) == b"x.y,host=b value=1.0" + NS


# --- extra tags ----------------------------------------------------------------------------------


def test_extra_tags_are_added() -> None:
    """Tags after the template are added to every point of that template, sorted by key."""
    templates = ["stats.* .host.measurement* region=eu-east,agent=sensu"]
    assert convert(templates, b"stats.web01.cpu 1" + TS) == (
        b"cpu,agent=sensu,host=web01,region=eu-east value=1.0" + NS
    )


def test_extra_tags_on_default_entry() -> None:
    """A default entry (no filter) may carry extra tags too."""
    assert convert(["measurement* dc=dc1"], b"cpu.load 1" + TS) == (
        b"cpu.load,dc=dc1 value=1.0" + NS
    )


def test_tag_from_path_wins_over_extra_tag() -> None:
    """A tag taken from the path replaces an extra tag with the same key."""
    assert convert(["host.measurement host=unknown"], b"web01.cpu 1" + TS) == (
        b"cpu,host=web01 value=1.0" + NS
    )


# --- escaping ------------------------------------------------------------------------------------


def test_measurement_escapes_commas_only() -> None:
    """Commas in a measurement are escaped; '=' needs no escape there."""
    assert convert(["measurement*"], b"a,b.c=d 1" + TS) == b"a\\,b.c=d value=1.0" + NS


def test_tag_values_and_field_key_escape_commas_and_equals() -> None:
    """Commas and '=' in tag values and field keys are escaped."""
    assert convert(["measurement.host.field"], b"cpu.a,b=c.x=y 1" + TS) == (
        b"cpu,host=a\\,b\\=c x\\=y=1.0" + NS
    )


# --- values and timestamps -----------------------------------------------------------------------


def test_value_is_written_as_float() -> None:
    """Integers, signs and exponents are accepted and written as floats."""
    assert convert(["measurement*"], b"m -3" + TS) == b"m value=-3.0" + NS
    assert convert(["measurement*"], b"m 1.5e3" + TS) == b"m value=1500.0" + NS


def test_missing_timestamp_uses_now() -> None:
    """A line without a timestamp gets ``now_ns``."""
    assert convert(["measurement*"], b"m 1") == b"m value=1.0 %d" % NOW


def test_minus_one_timestamp_uses_now() -> None:
    """A timestamp of -1 (carbon's 'now') gets ``now_ns``."""
    assert convert(["measurement*"], b"m 1 -1") == b"m value=1.0 %d" % NOW


def test_fractional_timestamp_is_exact_to_the_nanosecond() -> None:
    """Fractional seconds are converted exactly, without float rounding."""
    assert convert(["measurement*"], b"m 1 1700000000.123456789") == (
        b"m value=1.0 1700000000123456789"
    )


def test_line_with_surrounding_whitespace_and_tabs() -> None:
    """Fields may be separated by any whitespace, and a trailing CR is ignored."""
    assert convert(["measurement*"], b"  m\t1 \t1700000000\r\n") == b"m value=1.0" + NS


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"m", "got 1 field(s)"),
        (b"m 1 1700000000 extra", "got 4 field(s)"),
        (b"m abc 1700000000", "is not a number"),
        (b"m 1_000 1700000000", "is not a number"),
        (b"m NaN 1700000000", "is not finite"),
        (b"m inf 1700000000", "is not finite"),
        (b"m 1e400 1700000000", "is not finite"),
        (b"m 1 yesterday", "timestamp 'yesterday' is not a number"),
        (b"m 1 nan", "timestamp 'nan' is not finite"),
        (b"m 1 1700000000000", "out of range"),
        (b"m\xff 1 1700000000", "not UTF-8"),
        (b"a\\b 1 1700000000", "backslash"),
        (b"#m 1 1700000000", "line-protocol comment"),
    ],
    ids=lambda value: value.decode(errors="replace") if isinstance(value, bytes) else None,
)
def test_bad_line_raises(line: bytes, reason: str) -> None:
    """A malformed line raises GraphiteError saying why."""
    with pytest.raises(GraphiteError, match=re.escape(reason)):
        convert(["measurement*"], line)


def test_field_named_time_is_refused() -> None:
    """A field key 'time' taken from the path is refused (InfluxDB would drop the point)."""
    with pytest.raises(GraphiteError, match="'time' is not a valid field key"):
        convert(["measurement.field"], b"cpu.time 1" + TS)


# --- whole messages ------------------------------------------------------------------------------


def test_convert_keeps_good_lines_and_reports_bad_ones() -> None:
    """A message's good lines are converted while bad ones come back with their reason."""
    converter = GraphiteConverter([".host.measurement"])
    payload = b"s.a.cpu 1 1700000000\r\ns.b.cpu NaN 1700000000\n\n  \ns.c.mem 2\nbroken\n"
    lines, bad = converter.convert(payload, NOW)
    assert lines == b"cpu,host=a value=1.0" + NS + b"\nmem,host=c value=2.0 %d" % NOW
    assert [line for line, _ in bad] == [b"s.b.cpu NaN 1700000000", b"broken"]
    assert "not finite" in bad[0][1]
    assert "got 1 field(s)" in bad[1][1]


def test_convert_of_empty_message() -> None:
    """A message of blank lines converts to nothing and reports nothing."""
    assert GraphiteConverter(["measurement*"]).convert(b"\n \r\n", NOW) == (b"", [])


def test_cache_overflow_keeps_results_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """Conversions stay correct when more paths are seen than the prefix cache holds."""
    monkeypatch.setattr(router.graphite, "_CACHE_SIZE", 2)
    converter = GraphiteConverter(["host.measurement"])
    payload = b"\n".join(b"h%d.m%d %d 1700000000" % (i % 5, i % 5, i) for i in range(20))
    lines, bad = converter.convert(payload, NOW)
    assert bad == []
    assert lines.split(b"\n") == [
        b"m%d,host=h%d value=%d.0" % (i % 5, i % 5, i) + NS for i in range(20)
    ]


# --- parsing templates ---------------------------------------------------------------------------


def test_parse_templates_returns_filter_parts_and_sorted_tags() -> None:
    """Each entry becomes a Template with its filter, parts and sorted extra tags."""
    assert parse_templates(["servers.* .host.measurement* z=1,a=2", "measurement*"]) == [
        Template("servers.*", ("", "host", "measurement*"), (("a", "2"), ("z", "1"))),
        Template("", ("measurement*",)),
    ]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("", "empty template"),
        ("   ", "empty template"),
        ("host.region", "no 'measurement'"),
        ("servers.* host.field", "no 'measurement'"),
        ("a b c d", "expected '[filter] template"),
        ("a b c", "expected '[filter] template"),
        ("servers..cpu measurement", "empty section"),
        ("serv*.cpu measurement", "must be a whole section"),
        ("measurement*.field*", "one of 'measurement*' and 'field*'"),
        ("measurement*.host", "nothing may follow 'measurement*'"),
        ("measurement.field*.host", "nothing may follow 'field*'"),
        ("measurement.host*", "invalid part 'host*'"),
        ("measurement.host=a", "invalid part 'host=a'"),
        ("measurement.time", "'time' is not a valid tag key"),
        ("measurement time=now", "'time' is not a valid tag key"),
        ("measurement region=", "invalid tag 'region='"),
        ("measurement =eu", "invalid tag '=eu'"),
        ("measurement a=b=c", "invalid tag 'a=b=c'"),
        ("measurement a=1,,b=2", "invalid tag ''"),
        ("measurement a=1,a=2", "tag 'a' given twice"),
        ("measurement a=x\\y", "backslash"),
    ],
)
def test_invalid_template_is_refused(entry: str, reason: str) -> None:
    """parse_templates refuses a malformed entry with a reason and the entry's index."""
    with pytest.raises(GraphiteError, match=re.escape(reason)) as caught:
        parse_templates(["stats.* measurement*", entry])
    assert caught.value.index == 1


@pytest.mark.parametrize(
    "templates",
    [["cpu.* measurement", "cpu.* measurement.field"], ["measurement", "measurement*"]],
)
def test_duplicate_filter_is_refused(templates: list[str]) -> None:
    """Two entries with the same filter (or two defaults) are refused."""
    with pytest.raises(GraphiteError, match="duplicate") as caught:
        parse_templates(templates)
    assert caught.value.index == 1


def test_converter_refuses_invalid_templates() -> None:
    """Building a converter with an invalid template raises GraphiteError at once."""
    with pytest.raises(GraphiteError, match="no 'measurement'"):
        GraphiteConverter(["host.region"])

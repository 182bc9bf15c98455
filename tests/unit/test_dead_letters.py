"""Dead letters without Kafka: fitting a line, building headers, counting delivery reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from devstack import stack
from router.errors import DeadLetterError, SourceError
from router.kafka import (
    DEFAULT_MESSAGE_MAX_BYTES,
    HEADER_ROOM,
    REASON_MAX_BYTES,
    DeadLetter,
    _Deliveries,
    describe_kafka_error,
    encode_letter,
    fit_letter,
    shorten_reason,
)


def letter(line: bytes = b"cpu value=oops 1", reason: str = "invalid field format") -> DeadLetter:
    return DeadLetter(line, reason, "metrics.dc1", 3, 1234, "influx-a", "dc1-metrics")


def test_a_line_that_fits_is_kept_whole() -> None:
    """A line within the limit comes back unchanged, with no original length."""
    assert fit_letter(b"cpu value=1 1", 100) == (b"cpu value=1 1", None)


def test_a_line_exactly_at_the_limit_is_kept_whole() -> None:
    """The limit is inclusive: a line of exactly ``limit`` bytes is not cut."""
    assert fit_letter(b"x" * 10, 10) == (b"x" * 10, None)


def test_a_long_line_is_cut_to_the_limit_and_reports_its_length() -> None:
    """A longer line keeps its first ``limit`` bytes and says how long it was."""
    assert fit_letter(b"abcdefghij", 4) == (b"abcd", 10)


def test_the_cut_never_splits_a_utf8_character() -> None:
    """A cut that would fall inside a multi-byte character backs off to its first byte."""
    line = b"ab" + "€".encode() + b"cd"  # the euro sign is 3 bytes
    value, original = fit_letter(line, 4)
    assert value == b"ab"
    assert original == len(line)
    value.decode()  # valid UTF-8


def test_invalid_utf8_is_cut_at_the_limit() -> None:
    """Bytes that are not UTF-8 at all are cut at the limit rather than backed off further."""
    line = b"a" + b"\x80" * 10
    assert fit_letter(line, 6) == (line[:6], 11)


def test_headers_name_the_reason_and_the_source() -> None:
    """Every letter carries its reason, source topic/partition/offset, cluster and route."""
    value, headers = encode_letter(letter())
    assert value == b"cpu value=oops 1"
    assert dict(headers) == {
        "reason": b"invalid field format",
        "source_topic": b"metrics.dc1",
        "source_partition": b"3",
        "source_offset": b"1234",
        "cluster": b"influx-a",
        "route": b"dc1-metrics",
    }


def test_an_oversize_line_is_truncated_with_a_truncated_header() -> None:
    """A 2 MB line is cut to fit message.max.bytes, and ``truncated`` holds its length."""
    line = b"cpu value=" + b"9" * 2_000_000
    value, headers = encode_letter(letter(line), DEFAULT_MESSAGE_MAX_BYTES)
    assert dict(headers)["truncated"] == str(len(line)).encode()
    assert dict(headers)["reason"] == b"invalid field format"
    assert line.startswith(value)
    header_bytes = sum(len(k) + len(v) for k, v in headers)
    assert len(value) + header_bytes + HEADER_ROOM <= DEFAULT_MESSAGE_MAX_BYTES


def test_the_limit_follows_the_configured_message_max_bytes() -> None:
    """A smaller message.max.bytes gives a shorter value that still fits under it."""
    value, headers = encode_letter(letter(b"x" * 50_000), 10_000)
    record = len(value) + sum(len(k) + len(v) for k, v in headers)
    assert len(value) > 8_000
    assert record <= 10_000 - HEADER_ROOM


def test_a_short_reason_is_kept_as_it_is() -> None:
    """A reason within the cap is only encoded, not changed."""
    assert shorten_reason("unable to parse 'x': bad") == (b"unable to parse 'x': bad", None)


def test_a_huge_reason_keeps_its_start_and_its_end() -> None:
    """InfluxDB quotes the whole line in its reason: a long one keeps both ends around '...'."""
    reason = "unable to parse 'cpu value=" + "9" * 100_000 + "': invalid number"
    short, original = shorten_reason(reason)
    assert original == len(reason)
    assert len(short) <= REASON_MAX_BYTES
    assert short.startswith(b"unable to parse 'cpu value=99")
    assert short.endswith(b"': invalid number")
    assert b"..." in short


def test_a_shortened_reason_is_still_utf8() -> None:
    """Neither end of a shortened reason splits a multi-byte character."""
    short, _ = shorten_reason("é" * 10_000, 101)
    short.decode()
    assert len(short) <= 101


def test_an_oversize_reason_adds_a_reason_truncated_header() -> None:
    """A letter whose reason was shortened says the reason's original length."""
    reason = "unable to parse '" + "x" * 2_000_000 + "': bad"
    _, headers = encode_letter(letter(b"x" * 2_000_000, reason))
    assert dict(headers)["reason_truncated"] == str(len(reason)).encode()
    assert len(dict(headers)["reason"]) <= REASON_MAX_BYTES


def test_deliveries_wait_for_every_expected_letter() -> None:
    """A call is settled once every letter it produced has reported."""
    d = _Deliveries()
    d.expect()
    d.expect()
    d.on_delivery(None, None)  # type: ignore[arg-type]
    assert d.state() == (1, 1, 0, None)
    d.on_delivery(None, None)  # type: ignore[arg-type]
    assert d.state() == (0, 2, 0, None)


def test_deliveries_keep_the_first_error() -> None:
    """The first failed report is the one the error message names."""
    d = _Deliveries()
    for _ in range(3):
        d.expect()
    first = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
    d.on_delivery(first, None)  # type: ignore[arg-type]
    d.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)  # type: ignore[arg-type]
    pending, stored, failed, error = d.state()
    assert (pending, stored, failed) == (1, 0, 2)
    assert error is not None
    assert error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART


def test_a_refused_produce_is_not_waited_for() -> None:
    """A letter produce() refused reports nothing, so it is no longer expected."""
    d = _Deliveries()
    d.expect()
    d.forget()
    assert d.state() == (0, 0, 0, None)


def test_an_error_is_described_by_name_with_a_hint() -> None:
    """A known Kafka error is named and says what to check."""
    text = describe_kafka_error(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    assert text.startswith("TOPIC_AUTHORIZATION_FAILED (")
    assert "ACL" in text


def test_dead_letter_error_is_a_source_error() -> None:
    """Code that handles Kafka failures handles dead-letter failures too."""
    exc = DeadLetterError("dead letters to t: failed", topic="t", code="_UNKNOWN_TOPIC")
    assert isinstance(exc, SourceError)
    assert (exc.topic, exc.code) == ("t", "_UNKNOWN_TOPIC")


def test_the_local_kafka_never_auto_creates_topics() -> None:
    """The devstack broker keeps a missing topic missing, as production clusters do."""
    assert "auto.create.topics.enable=false" in stack._kafka_properties().splitlines()


def test_a_broker_started_with_other_settings_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack dir whose server.properties enables auto-creation gets Kafka restarted."""
    monkeypatch.setenv("FROUTER_STACK_DIR", str(tmp_path))
    props = tmp_path / "kafka" / "server.properties"
    props.parent.mkdir()
    props.write_text(
        stack._kafka_properties().replace(
            "auto.create.topics.enable=false", "auto.create.topics.enable=true"
        )
    )
    assert stack._kafka_stale()
    props.write_text(stack._kafka_properties())
    assert not stack._kafka_stale()

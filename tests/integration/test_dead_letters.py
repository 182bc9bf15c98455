"""The dead-letter producer against the real Kafka of the local stack (auto-create off).

Each test has its own topics (``Scenario.create_topic`` makes the data and dead-letter
topics); a "missing" topic is one nobody created, and the broker never creates it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from structlog.testing import capture_logs

from router.errors import DeadLetterError
from router.kafka import DeadLetter, DeadLetterProducer
from tests.integration.harness import RouterProc, Scenario, new_tag, read_letters, write_yaml
from tests.support import wait_until

pytestmark = pytest.mark.integration

DELIVERY_TIMEOUT = 6.0  # the verdict on a missing topic comes after half of it


@pytest.fixture
def sc(stack_env: dict[str, str]) -> Iterator[Scenario]:
    scenario = Scenario(stack_env, new_tag())
    scenario.create_topic()
    yield scenario
    scenario.close()


@pytest.fixture
def producer(sc: Scenario) -> Iterator[DeadLetterProducer]:
    dlp = DeadLetterProducer(
        {"bootstrap.servers": sc.bootstrap},
        sc.dead_letter_topic,
        delivery_timeout=DELIVERY_TIMEOUT,
    )
    yield dlp
    dlp.close(5)


def letter(sc: Scenario, offset: int, line: bytes | None = None) -> DeadLetter:
    body = line if line is not None else f"{sc.measurement} value=oops{offset} 1".encode()
    return DeadLetter(body, "invalid field format", sc.topic, 2, offset, "influx-a", "r")


def test_letters_to_an_existing_topic_are_stored_with_every_header(
    sc: Scenario, producer: DeadLetterProducer
) -> None:
    """send() returns the count once stored, and each record carries its line and headers."""
    assert producer.send([letter(sc, 7), letter(sc, 8)]) == 2
    records = sorted(read_letters(sc, 2), key=lambda r: r[1]["source_offset"])
    assert [value for value, _ in records] == [letter(sc, 7).line, letter(sc, 8).line]
    assert records[0][1] == {
        "reason": b"invalid field format",
        "source_topic": sc.topic.encode(),
        "source_partition": b"2",
        "source_offset": b"7",
        "cluster": b"influx-a",
        "route": b"r",
    }


def test_a_missing_topic_fails_in_bounded_time_and_names_the_topic(sc: Scenario) -> None:
    """With auto-create off, a missing topic raises DeadLetterError within the delivery timeout."""
    missing = f"it.{sc.tag}.missing"
    dlp = DeadLetterProducer(
        {"bootstrap.servers": sc.bootstrap}, missing, delivery_timeout=DELIVERY_TIMEOUT
    )
    started = time.monotonic()
    with pytest.raises(DeadLetterError) as caught:
        dlp.send([letter(sc, 1)])
    elapsed = time.monotonic() - started
    assert elapsed < DELIVERY_TIMEOUT + 1
    assert missing in str(caught.value)
    assert caught.value.topic == missing
    assert "UNKNOWN_TOPIC" in caught.value.code
    assert "does not exist" in str(caught.value)
    # and again: a producer that already knows the topic is missing says so at once
    with pytest.raises(DeadLetterError, match=missing):
        dlp.send([letter(sc, 2)])
    dlp.close(1)


def test_a_stuck_letter_does_not_fail_a_concurrent_send_on_the_same_producer(
    sc: Scenario, producer: DeadLetterProducer
) -> None:
    """One thread's letter waiting on a missing topic neither delays nor fails another thread's
    send to an existing topic through the same librdkafka producer."""
    stuck = producer.with_topic(f"it.{sc.tag}.missing")
    outcome: dict[str, BaseException | float] = {}

    def send_stuck() -> None:
        started = time.monotonic()
        try:
            stuck.send([letter(sc, 1)])
        except DeadLetterError as exc:
            outcome["stuck"] = exc
        else:
            outcome["stuck"] = time.monotonic() - started

    thread = threading.Thread(target=send_stuck)
    thread.start()
    try:
        queue = producer._shared.current(producer.topic).producer
        wait_until(lambda: len(queue) > 0, timeout=5, what="the stuck letter queued")
        started = time.monotonic()
        assert producer.send([letter(sc, 2), letter(sc, 3)], timeout=DELIVERY_TIMEOUT / 3) == 2
        assert time.monotonic() - started < DELIVERY_TIMEOUT / 3
        assert "stuck" not in outcome  # the other letter is still waiting for its verdict
    finally:
        thread.join(DELIVERY_TIMEOUT + 10)
    assert isinstance(outcome["stuck"], DeadLetterError)
    assert len(read_letters(sc, 2)) == 2


def test_an_oversize_line_lands_truncated_with_its_original_length(
    sc: Scenario, producer: DeadLetterProducer
) -> None:
    """A 2 MB line is stored cut to fit, with ``truncated`` = its length and the reason kept."""
    line = f"{sc.measurement} value=".encode() + b"9" * 2_000_000
    assert producer.send([letter(sc, 5, line)]) == 1
    [(value, headers)] = read_letters(sc, 1)
    assert headers["truncated"] == str(len(line)).encode()
    assert headers["reason"] == b"invalid field format"
    assert headers["source_offset"] == b"5"
    assert line.startswith(value)
    assert 900_000 < len(value) < 1_000_000


def test_a_producer_that_failed_fatally_is_rebuilt_on_the_next_send(
    sc: Scenario, producer: DeadLetterProducer
) -> None:
    """After a fatal producer error the next send builds a new producer, says so, and stores."""
    # librdkafka offers no way to provoke a real fatal error from Python: record one as the
    # error callback does (the rebuild, the event and the send are real)
    producer._shared.current(producer.topic).failed_fatally(
        KafkaError(KafkaError._FATAL, "test: producer fenced", fatal=True)
    )
    with capture_logs() as logs:
        assert producer.send([letter(sc, 9)]) == 1
    assert [e["event"] for e in logs] == ["dead_letter_producer_rebuilt"]
    assert logs[0]["topic"] == sc.dead_letter_topic
    assert "_FATAL" in logs[0]["reason"]
    assert len(read_letters(sc, 1)) == 1


def test_router_holds_a_partition_while_the_dead_letter_topic_is_missing(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """With the dead-letter topic missing (auto-create off) a bad line does not stop the
    cluster from getting the good ones, the destination shows `blocked` with the error and
    counts it, nothing is committed past the bad line, and once the topic exists everything
    drains: the letter lands and every group commits to the end."""
    sc = Scenario(stack_env, new_tag())
    admin = AdminClient({"bootstrap.servers": sc.bootstrap})
    admin.create_topics([NewTopic(sc.topic, num_partitions=sc.partitions, replication_factor=1)])[
        sc.topic
    ].result(15)
    router = RouterProc(write_yaml(tmp_path / "r.yaml", sc.topology()), tmp_path)
    try:
        sc.produce(0, 400, bad_every=400)  # message 0 (partition 0, offset 0) is malformed
        router.start()

        def blocked() -> bool:
            d = router.destination("r", "a")
            return d["state"] == "blocked" and "dead letters" in d["error"]

        wait_until(blocked, timeout=60, what="destination a blocked on its dead letters")
        sc.wait_count("a", 399, timeout=60)
        sc.produce(400, 400)
        sc.wait_count("a", 799, timeout=60)  # later good lines still arrive
        assert router.metric("frouter_dead_letter_errors_total", cluster="influx-a") >= 1
        assert sc.committed("r", "a")[(sc.topic, 0)] <= 0  # nothing past the bad line
        admin.create_topics(
            [NewTopic(sc.dead_letter_topic, num_partitions=1, replication_factor=1)]
        )[sc.dead_letter_topic].result(15)
        sc.wait_committed_to_end("r", "a", timeout=90)
        letters = read_letters(sc, 1)
        assert letters[0][1]["source_offset"] == b"0"
        wait_until(
            lambda: router.destination("r", "a")["state"] == "active",
            timeout=30,
            what="destination a active again",
        )
        assert sc.count("a") == 799
    finally:
        if router.proc is not None:
            router.stop()
        sc.close()

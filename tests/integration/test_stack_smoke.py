"""Each part of the local stack is a real server that does its job."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from devstack.toxiproxy import Toxiproxy
from tests.support import influx_count, wait_until

pytestmark = pytest.mark.integration


def _write(url: str, db: str, body: str, timeout: float = 5.0) -> httpx.Response:
    return httpx.post(f"{url}/write", params={"db": db}, content=body, timeout=timeout)


def test_kafka_produce_consume_commit(stack_env: dict[str, str]) -> None:
    """Line-protocol messages round-trip through a consumer group that commits its offsets."""
    bootstrap = stack_env["KAFKA_BOOTSTRAP"]
    topic = f"smoke.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(10)

    producer = Producer({"bootstrap.servers": bootstrap})
    sent = [f"cpu,host=h{i} value={i}i {1_700_000_000_000_000_000 + i}" for i in range(90)]
    for i, line in enumerate(sent):
        producer.produce(topic, line.encode(), partition=i % 3)
    assert producer.flush(10) == 0

    group = f"smoke-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    received: list[str] = []
    deadline = time.monotonic() + 30
    while len(received) < len(sent) and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=100, timeout=0.5):
            assert msg.error() is None
            received.append(bytes(msg.value() or b"").decode())
    consumer.commit(asynchronous=False)
    consumer.close()
    assert sorted(received) == sorted(sent)

    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    committed = reader.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    reader.close()
    assert [tp.offset for tp in committed] == [30, 30, 30]


@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_influx_write_and_query_direct_and_proxied(stack_env: dict[str, str], name: str) -> None:
    """Points written to each InfluxDB, directly and through Toxiproxy, are counted back."""
    db = stack_env["INFLUX_DATABASE"]
    measurement = f"smoke_{uuid.uuid4().hex[:8]}"
    direct = stack_env[f"INFLUX_{name}_URL"]
    proxied = stack_env[f"INFLUX_{name}_PROXY_URL"]
    assert _write(direct, db, f"{measurement} value=1 1000000000\n").status_code == 204
    assert _write(proxied, db, f"{measurement} value=2 2000000000\n").status_code == 204
    assert influx_count(direct, db, measurement) == 2
    assert influx_count(proxied, db, measurement) == 2


def test_toxiproxy_timeout_makes_write_fail_within_client_timeout(
    stack_env: dict[str, str], toxiproxy: Toxiproxy
) -> None:
    """A timeout toxic makes a proxied write time out at the client's timeout, not later."""
    url, db = stack_env["INFLUX_A_PROXY_URL"], stack_env["INFLUX_DATABASE"]
    toxiproxy.add_toxic(stack_env["INFLUX_A_PROXY_NAME"], "timeout", {"timeout": 0})
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        _write(url, db, "smoke_timeout value=1 1000000000\n", timeout=1.0)
    assert time.monotonic() - started < 3.0


def test_toxiproxy_cut_and_restore(stack_env: dict[str, str], toxiproxy: Toxiproxy) -> None:
    """A cut proxy makes its InfluxDB unreachable; restoring it brings the cluster back."""
    url = stack_env["INFLUX_B_PROXY_URL"]
    name = stack_env["INFLUX_B_PROXY_NAME"]
    toxiproxy.set_enabled(name, False)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/ping", timeout=2)
    toxiproxy.set_enabled(name, True)
    wait_until(
        lambda: httpx.get(f"{url}/ping", timeout=2).status_code == 204,
        timeout=10,
        what="proxied /ping answers again",
    )

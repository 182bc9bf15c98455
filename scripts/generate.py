"""A small metric generator: line-protocol messages to a Kafka topic at a steady rate.

python -m scripts.generate --topic metrics.dc1 --rate 2000 [--seconds 0 (forever)]

A topic that does not exist yet is created first (4 partitions): the local stack's Kafka never
creates a topic on its own (``auto.create.topics.enable=false``).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic


def lines(measurement: str, hosts: int, seq: int, now_ns: int) -> list[bytes]:
    """One point per host for sequence number ``seq`` (distinct series+timestamp each)."""
    tags = f"{measurement},dc=dc1,host=h"
    return [
        f"{tags}{h:03d} value={random.random():.4f},seq={seq}i {now_ns + h}".encode()
        for h in range(hosts)
    ]


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int = 4) -> list[str]:
    """Create those of ``topics`` that do not exist yet; return the names created."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=15).topics
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing]
    )
    for future in futures.values():
        try:
            future.result(15)
        except KafkaException as exc:  # created meanwhile by someone else: fine
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return missing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    p.add_argument("--topic", action="append", default=None)
    p.add_argument("--measurement", default="demo_cpu")
    p.add_argument("--rate", type=float, default=2000.0, help="points per second")
    p.add_argument("--hosts", type=int, default=20, help="points (series) per message")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: never)")
    args = p.parse_args()
    topics = args.topic or ["metrics.dc1"]
    created = ensure_topics(args.bootstrap, topics)
    if created:
        print(f"generator: created topic(s) {', '.join(created)}", flush=True)
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 20})
    per_msg = args.hosts
    interval = per_msg / args.rate
    start = time.monotonic()
    seq = 0
    sent = 0
    next_report = start + 5
    while args.seconds <= 0 or time.monotonic() - start < args.seconds:
        body = b"\n".join(lines(args.measurement, per_msg, seq, time.time_ns()))
        for topic in topics:
            producer.produce(topic, body)
        producer.poll(0)
        seq += 1
        sent += per_msg
        if time.monotonic() >= next_report:
            print(f"generator: {sent} points sent to {', '.join(topics)}", flush=True)
            next_report += 5
        time.sleep(max(0.0, start + seq * interval - time.monotonic()))
    producer.flush(10)


if __name__ == "__main__":
    main()

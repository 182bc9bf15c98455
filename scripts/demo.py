"""`./dev demo`: the router on the local stack with topology.yaml and a metric generator.

Points flow to influx-a (primary of dc1-metrics) and to all four clusters (dc1-mirror).
Watch http://127.0.0.1:8080/ and break things from another shell:

    ./dev stack cut influx-a      # Toxiproxy refuses connections: influx-a goes DOWN
    ./dev stack restore influx-a  # back: influx-a replays what it missed
    edit topology.yaml: drain: true under influx-a   (graceful hand-over, no duplicates)

Ctrl-C stops the generator and the router (SIGTERM: in-flight writes finish and commit).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from devstack import stack
from router.topology import load_topology
from scripts.generate import ensure_topics

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default=str(ROOT / "topology.yaml"))
    p.add_argument("--rate", type=float, default=2000.0, help="points per second per topic")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: never)")
    p.add_argument(
        "--consul", action="store_true", help="shared verdict through the devstack Consul"
    )
    args = p.parse_args()
    print(__doc__, flush=True)
    # The stack's Kafka never auto-creates topics: the routes' topics and the dead-letter topic
    # exist before the router subscribes or has a line to dead-letter.
    topology = load_topology(args.topology)
    topics = [t for route in topology.routes for t in route.topics if not t.startswith("^")]
    created = ensure_topics(topology.kafka.bootstrap, [topology.kafka.dead_letters, *topics])
    if created:
        print(f"demo: created topic(s) {', '.join(created)}", flush=True)
    consul = ["--consul-addr", stack.endpoints()["CONSUL_HTTP_ADDR"]] if args.consul else []
    router = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "run", "--topology", args.topology, *consul]
    )
    generator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.generate",
            "--topic",
            "metrics.dc1",
            "--topic",
            "metrics.mirror",
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.seconds),
        ]
    )
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stopping and router.poll() is None:
        if generator.poll() is not None and args.seconds > 0:
            time.sleep(5)  # let the last batches land before stopping
            break
        time.sleep(0.5)
    generator.terminate()
    generator.wait(10)
    if router.poll() is None:
        router.send_signal(signal.SIGTERM)
    return router.wait(90)


if __name__ == "__main__":
    sys.exit(main())

"""A ConfigMap edit is a live drain: the topology laid out the way kubelet mounts a ConfigMap
(a ``..data`` symlink to a timestamped directory, swapped atomically on every update), edited by
swapping it, reaches the running router with no restart.

kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go) writes each update into a new hidden
directory ``..<timestamp>``, points a temporary symlink ``..data_tmp`` at it, renames that over
``..data`` (one atomic rename) and removes the old directory; the visible ``topology.yaml`` is a
symlink to ``..data/topology.yaml`` that never changes. A watch on the file's inode or mtime
would see nothing; the router hashes the content, so it must see every swap.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, Scenario, new_tag, wait_paused
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"
KEY = "topology.yaml"


class KubeletVolume:
    """A ConfigMap volume as kubelet lays it out, with the same update protocol."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.generations = 0

    @property
    def path(self) -> Path:
        """What the pod sees: <mount>/topology.yaml (a symlink that never changes)."""
        return self.root / KEY

    def update(self, doc: dict[str, Any] | str) -> Path:
        """Write a new version: new timestamped dir, ``..data`` swapped by one rename, the old
        dir removed. Returns the new timestamped dir."""
        self.generations += 1
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        ts_dir = self.root / f"..{stamp}.{time.monotonic_ns() % 10**9:09d}{self.generations}"
        ts_dir.mkdir()
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        (ts_dir / KEY).write_text(text)
        data = self.root / "..data"
        old = Path(os.readlink(data)) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(ts_dir.name)
        tmp.replace(data)  # rename(2): atomic
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{KEY}")
        if old is not None:
            shutil.rmtree(self.root / old)
        return ts_dir


@pytest.fixture
def scenario(stack_env: dict[str, str], toxiproxy: Toxiproxy) -> Iterator[Scenario]:
    sc = Scenario(stack_env, new_tag())
    sc.create_topic()
    yield sc
    sc.close()


def test_configmap_symlink_swap_drains_and_undrains_live(
    scenario: Scenario, tmp_path: Path
) -> None:
    """Swapping the mounted ConfigMap to `drain: true` hands the route to the standby exactly
    at the primary's last commit (no duplicate, no loss) in the same process; a swap to an
    invalid file is refused while the drain holds; swapping back undrains: the primary replays
    and the standby hands back."""
    sc = scenario
    volume = KubeletVolume(tmp_path / "topology")
    doc = sc.topology()
    first = volume.update(doc)
    assert volume.path.resolve() == (first / KEY).resolve()
    router = RouterProc(volume.path, tmp_path).start()
    try:
        pid = router.proc.pid if router.proc else 0
        sc.produce(0, 1000)
        sc.wait_count("a", 1000)
        sc.wait_committed_to_end(ROUTE, "a")

        # The drain: a ConfigMap edit, as kubelet delivers it.
        second = volume.update(sc.topology(drain=["a"]))
        assert not first.exists() and volume.path.resolve() == (second / KEY).resolve()
        wait_until(lambda: router.destination(ROUTE, "b")["active"], timeout=30, what="b active")
        wait_paused(router, ROUTE, "a")
        sc.produce(1000, 1000)
        sc.wait_committed_to_end(ROUTE, "b")
        total = 2000
        assert sc.count("a") + sc.count("b") == total  # nothing written twice
        assert sc.values("a") | sc.values("b") == set(range(total))  # nothing lost
        committed_a = sc.committed(ROUTE, "a")
        starts = [
            e
            for e in router.events("destination_state")
            if e["cluster"] == "influx-b" and e["to_state"] == "active"
        ]
        assert starts[0]["starts"] == {f"{t}[{p}]": o for (t, p), o in committed_a.items()}
        assert router.metric("frouter_topology_reloads_total", outcome="applied") == 1
        assert router.metric("frouter_cluster_drained", cluster="influx-a") == 1

        # A broken edit (a typo in kubectl edit) is refused; the drain stays.
        volume.update(yaml.safe_dump(sc.topology(drain=["a"])).replace("primary:", "primry:"))
        wait_until(
            lambda: router.metric("frouter_topology_reloads_total", outcome="rejected") == 1,
            timeout=20,
            what="the invalid edit refused",
        )
        assert router.metric("frouter_topology_last_reload_ok") == 0
        assert "primry" in router.status()["topology_error"]
        sc.produce(2000, 500)
        sc.wait_committed_to_end(ROUTE, "b")
        assert router.destination(ROUTE, "a")["active"] is False

        # The undrain: the primary replays what it missed, then the standby hands back.
        volume.update(doc)
        total = 2500
        sc.wait_count("a", total, timeout=90)
        sc.wait_committed_to_end(ROUTE, "a")
        wait_paused(router, ROUTE, "b")
        assert router.metric("frouter_topology_last_reload_ok") == 1
        assert router.metric("frouter_topology_reloads_total", outcome="applied") == 2

        # All of it in one process: no restart, no rollout.
        assert router.proc is not None and router.proc.poll() is None
        assert router.proc.pid == pid
        assert len(router.events("router_stopping")) == 0
    finally:
        assert router.stop() == 0

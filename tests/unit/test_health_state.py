"""Hysteresis and aggregation of node and cluster health (health.state), without servers."""

from __future__ import annotations

import pytest

from health.state import ClusterHealth, NodeHealth, Transition, redact_url
from health.verdict import ClusterState, Verdict

A, B, C = "http://a:8086", "http://b:8086", "http://c:8086"


def fail(cluster: ClusterHealth, node: str, times: int, now: float = 10.0) -> list[Transition]:
    """Feed ``times`` failures; return the transitions that came out."""
    results = [cluster.observe(node, False, "connection refused", now) for _ in range(times)]
    return [r for r in results if r is not None]


def succeed(cluster: ClusterHealth, node: str, times: int, now: float = 20.0) -> list[Transition]:
    """Feed ``times`` successes; return the transitions that came out."""
    results = [cluster.observe(node, True, "ping ok", now) for _ in range(times)]
    return [r for r in results if r is not None]


class TestNodeHealth:
    def test_starts_up(self) -> None:
        """A node starts UP, so writes can begin before the first probe."""
        assert NodeHealth(fall=3, rise=2).up

    def test_can_start_down(self) -> None:
        """A node created with initially_up=False starts DOWN."""
        assert not NodeHealth(fall=3, rise=2, initially_up=False).up

    def test_goes_down_after_fall_failures(self) -> None:
        """An UP node goes DOWN on exactly the fall-th consecutive failure."""
        node = NodeHealth(fall=3, rise=2)

        flips = [node.observe(False, "timeout") for _ in range(3)]

        assert flips == [False, False, True]
        assert not node.up

    def test_goes_up_after_rise_successes(self) -> None:
        """A DOWN node goes UP on exactly the rise-th consecutive success."""
        node = NodeHealth(fall=3, rise=2, initially_up=False)

        flips = [node.observe(True, "ok") for _ in range(2)]

        assert flips == [False, True]
        assert node.up

    def test_success_resets_failure_count(self) -> None:
        """A success between failures restarts the count towards fall."""
        node = NodeHealth(fall=3, rise=2)
        for ok in (False, False, True, False, False):
            node.observe(ok, "x")

        assert node.up
        assert node.observe(False, "x") is True

    def test_failure_resets_success_count(self) -> None:
        """A failure between successes restarts the count towards rise."""
        node = NodeHealth(fall=3, rise=3, initially_up=False)
        for ok in (True, True, False, True, True):
            node.observe(ok, "x")

        assert not node.up
        assert node.observe(True, "x") is True

    def test_further_failures_of_a_down_node_do_not_flip(self) -> None:
        """Once DOWN, more failures report no flip."""
        node = NodeHealth(fall=1, rise=1)
        node.observe(False, "x")

        assert [node.observe(False, "x") for _ in range(3)] == [False, False, False]

    def test_reason_names_the_last_failure(self) -> None:
        """A node that went DOWN says how many checks failed and the last error."""
        node = NodeHealth(fall=2, rise=1)
        node.observe(False, "timeout")
        node.observe(False, "connection refused")

        assert node.reason == "2/2 checks failed: connection refused"

    def test_rejects_zero_fall(self) -> None:
        """fall must be at least 1."""
        with pytest.raises(ValueError, match="fall"):
            NodeHealth(fall=0, rise=1)


class TestClusterHealth:
    def test_starts_up_with_start_time(self) -> None:
        """A new cluster is UP since its creation time, before any check."""
        cluster = ClusterHealth("a", [A], fall=3, rise=3, min_healthy=1, now=5.0)

        assert cluster.verdict() == Verdict("a", ClusterState.UP, 5.0, "not checked yet")

    def test_single_node_cluster_goes_down_after_fall(self) -> None:
        """A one-node cluster goes DOWN on the fall-th failure of its node."""
        cluster = ClusterHealth("a", [A], fall=3, rise=3, min_healthy=1)

        assert fail(cluster, A, 2) == []
        assert cluster.observe(A, False, "connection refused", 42.0) is not None
        assert cluster.verdict().state is ClusterState.DOWN

    def test_transition_is_returned_once(self) -> None:
        """Many failures produce one (UP, DOWN) transition, not one per failure."""
        cluster = ClusterHealth("a", [A], fall=2, rise=2, min_healthy=1)

        transitions = fail(cluster, A, 10)

        assert len(transitions) == 1

    def test_transition_is_old_then_new(self) -> None:
        """A transition is (old, new) and old is the verdict before it."""
        cluster = ClusterHealth("a", [A], fall=1, rise=1, min_healthy=1)
        before = cluster.verdict()

        transition = cluster.observe(A, False, "connection refused", 7.0)

        assert transition == (before, cluster.verdict())

    def test_down_verdict_has_reason_and_since(self) -> None:
        """A DOWN verdict carries the transition time and a reason naming node and error."""
        cluster = ClusterHealth("a", [A], fall=2, rise=2, min_healthy=1, now=1.0)
        cluster.observe(A, False, "timeout", 2.0)
        cluster.observe(A, False, "connection refused", 3.0)

        verdict = cluster.verdict()

        assert verdict.since == 3.0
        assert verdict.reason == (
            "0/1 nodes up (min_healthy 1); http://a:8086: 2/2 checks failed: connection refused"
        )

    def test_goes_up_after_rise(self) -> None:
        """A DOWN cluster goes UP on the rise-th success and reports (DOWN, UP)."""
        cluster = ClusterHealth("a", [A], fall=1, rise=3, min_healthy=1)
        fail(cluster, A, 1)

        transitions = succeed(cluster, A, 3)

        assert [(old.state, new.state) for old, new in transitions] == [
            (ClusterState.DOWN, ClusterState.UP)
        ]

    def test_stays_up_while_min_healthy_nodes_are_up(self) -> None:
        """With min_healthy=1, one DOWN node of two leaves the cluster UP."""
        cluster = ClusterHealth("a", [A, B], fall=1, rise=1, min_healthy=1)

        assert fail(cluster, A, 1) == []
        assert cluster.verdict().state is ClusterState.UP
        assert cluster.healthy_nodes() == [B]

    def test_goes_down_below_min_healthy(self) -> None:
        """With min_healthy=2 of three nodes, the second DOWN node takes the cluster DOWN."""
        cluster = ClusterHealth("a", [A, B, C], fall=1, rise=1, min_healthy=2)

        assert fail(cluster, A, 1) == []
        assert len(fail(cluster, B, 1)) == 1
        assert cluster.verdict().reason.startswith("1/3 nodes up (min_healthy 2); http://b:8086")

    def test_last_node_down_takes_cluster_down(self) -> None:
        """With min_healthy=1, the cluster goes DOWN only when its last node does."""
        cluster = ClusterHealth("a", [A, B], fall=1, rise=1, min_healthy=1)
        fail(cluster, A, 1)

        assert len(fail(cluster, B, 1)) == 1
        assert cluster.healthy_nodes() == []

    def test_healthy_nodes_keep_membership_order(self) -> None:
        """healthy_nodes lists UP nodes in the order they were configured."""
        cluster = ClusterHealth("a", [C, A, B], fall=1, rise=1, min_healthy=1)
        fail(cluster, A, 1)

        assert cluster.healthy_nodes() == [C, B]

    def test_set_nodes_keeps_state_of_staying_nodes(self) -> None:
        """A node that stays in the cluster keeps its DOWN state across a membership change."""
        cluster = ClusterHealth("a", [A, B], fall=1, rise=2, min_healthy=1)
        fail(cluster, A, 1)

        cluster.set_nodes([A, B, C], now=5.0)

        assert not cluster.node(A).up

    def test_set_nodes_keeps_counters_of_staying_nodes(self) -> None:
        """Successes counted before a membership change still count towards rise."""
        cluster = ClusterHealth("a", [A, B], fall=1, rise=2, min_healthy=1)
        fail(cluster, A, 1)
        succeed(cluster, A, 1)

        cluster.set_nodes([B, A], now=5.0)
        succeed(cluster, A, 1)

        assert cluster.node(A).up

    def test_new_node_starts_down_once_cluster_has_history(self) -> None:
        """A node added after the first check starts DOWN until rise successes."""
        cluster = ClusterHealth("a", [A], fall=3, rise=2, min_healthy=1)
        succeed(cluster, A, 1)

        cluster.set_nodes([A, B], now=5.0)

        assert cluster.healthy_nodes() == [A]
        succeed(cluster, B, 2)
        assert cluster.healthy_nodes() == [A, B]

    def test_new_node_starts_up_before_any_check(self) -> None:
        """A node added before the cluster observed anything starts UP like the first ones."""
        cluster = ClusterHealth("a", [A], fall=3, rise=2, min_healthy=1)

        cluster.set_nodes([A, B], now=5.0)

        assert cluster.healthy_nodes() == [A, B]

    def test_replacing_all_nodes_of_live_cluster_takes_it_down(self) -> None:
        """Replacing every node of a checked cluster reports (UP, DOWN) until the new ones rise."""
        cluster = ClusterHealth("a", [A], fall=3, rise=2, min_healthy=1)
        succeed(cluster, A, 1)

        transition = cluster.set_nodes([B], now=5.0)

        assert transition is not None
        assert transition[1] == Verdict(
            "a", ClusterState.DOWN, 5.0, "0/1 nodes up (min_healthy 1); topology changed"
        )

    def test_reconfiguration_is_judged_once(self) -> None:
        """Nodes and min_healthy changed together make one transition, judged on both."""
        cluster = ClusterHealth("a", [A, B], fall=1, rise=1, min_healthy=2)
        fail(cluster, A, 1)

        transition = cluster.set_nodes([B], now=5.0, min_healthy=1)

        assert transition is not None
        assert transition[1] == Verdict(
            "a", ClusterState.UP, 5.0, "1/1 nodes up (min_healthy 1); topology changed"
        )

    def test_raising_min_healthy_can_take_cluster_down(self) -> None:
        """A higher min_healthy than the UP nodes takes the cluster DOWN at once."""
        cluster = ClusterHealth("a", [A, B], fall=1, rise=1, min_healthy=1)
        fail(cluster, A, 1)

        assert cluster.set_nodes([A, B], now=5.0, min_healthy=2) is not None
        assert cluster.verdict().state is ClusterState.DOWN

    def test_set_nodes_rejects_duplicates(self) -> None:
        """A node listed twice is a configuration error."""
        cluster = ClusterHealth("a", [A], fall=1, rise=1, min_healthy=1)

        with pytest.raises(ValueError, match="duplicate"):
            cluster.set_nodes([A, A], now=1.0)

    def test_empty_cluster_is_down(self) -> None:
        """A cluster without nodes (e.g. no healthy Consul instance) starts DOWN."""
        cluster = ClusterHealth("a", [], fall=1, rise=1, min_healthy=1)

        assert cluster.verdict().state is ClusterState.DOWN

    def test_reason_never_carries_credentials(self) -> None:
        """Userinfo and query of a node URL never reach the verdict reason."""
        node = "http://admin:s3cret@a:8086/?u=admin&p=s3cret"
        cluster = ClusterHealth("a", [node], fall=1, rise=1, min_healthy=1)

        fail(cluster, node, 1)

        assert "s3cret" not in cluster.verdict().reason
        assert "http://a:8086/" in cluster.verdict().reason


def test_redact_url_strips_userinfo_and_query() -> None:
    """redact_url keeps scheme, host, port and path only."""
    assert redact_url("https://u:p@h:8086/influx?p=x#f") == "https://h:8086/influx"

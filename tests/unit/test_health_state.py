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


class TestDownAfterWindow:
    """The time window: a node with no good answer for ``down_after`` and a failed check in
    that time is DOWN, whatever the number of checks (defaults: interval 1 s, timeout 1 s,
    down_after 2.5 s, fall 3)."""

    def node(self, down_after: float | None = 2.5, fall: int = 3) -> NodeHealth:
        return NodeHealth(fall=fall, rise=3, down_after=down_after, mono=0.0)

    def test_no_window_before_a_failed_check(self) -> None:
        """A node whose checks all passed has no window running, however old its last answer."""
        node = self.node()
        node.observe(True, "ping ok", 1.0)

        assert node.deadline() is None
        assert node.expire(100.0) is False
        assert node.up

    def test_window_runs_from_the_last_good_answer(self) -> None:
        """A failed check starts the window at the last good answer, not at the failure."""
        node = self.node()
        node.observe(True, "ping ok", 1.0)
        node.observe(False, "no answer within 1s", 2.9)

        assert node.deadline() == 3.5

    def test_hung_node_goes_down_when_the_window_ends(self) -> None:
        """One probe timed out and the next still hangs: DOWN at last good answer + down_after,
        with fewer than fall failed checks, saying why."""
        node = self.node()
        node.observe(True, "ping ok", 0.5)
        node.observe(False, "no answer within 1s", 2.0)

        assert node.expire(2.99) is False
        assert node.expire(3.0) is True
        assert not node.up
        assert node.reason == "no good answer for 2.5s (1 check failed): no answer within 1s"
        assert node.deadline() is None  # DOWN: no window any more

    def test_a_failed_check_after_the_window_takes_the_node_down_at_once(self) -> None:
        """A check that fails when the last good answer is already down_after old is enough
        (the node was not judged at the window's end, e.g. no checker thread ran)."""
        node = self.node()
        node.observe(False, "write failed", 1.0)

        assert node.observe(False, "write failed", 2.5) is True
        assert node.reason == "no good answer for 2.5s (2 checks failed): write failed"

    def test_one_second_pause_is_ridden_out(self) -> None:
        """A node paused for 1 s (one probe timed out, then it answers) stays UP, and its
        window ends with the good answer."""
        node = self.node()
        node.observe(True, "ping ok", 10.0)  # the last answer before the pause
        node.observe(False, "no answer within 1s", 11.2)  # probed at 10.2, paused from 10.3
        node.observe(True, "ping ok", 11.35)  # probed again at once, answered after the pause

        assert node.deadline() is None
        assert node.expire(20.0) is False
        assert node.up

    def test_a_good_answer_restarts_the_window(self) -> None:
        """A failure after a good answer opens a new window from that answer."""
        node = self.node()
        node.observe(False, "x", 1.0)
        node.observe(True, "ok", 2.0)
        node.observe(False, "x", 4.0)

        assert node.deadline() == 4.5
        assert node.expire(4.4) is False

    def test_fall_still_decides_fast_failures(self) -> None:
        """Refused connections (fast failures) take a node DOWN on the fall-th, long before
        the window ends."""
        node = self.node()
        flips = [node.observe(False, "connection refused", t) for t in (0.1, 0.2, 0.3)]

        assert flips == [False, False, True]
        assert node.reason == "3/3 checks failed: connection refused"

    def test_window_off_leaves_fall_alone(self) -> None:
        """down_after None: no window, only fall consecutive failures."""
        node = self.node(down_after=None)
        node.observe(False, "no answer within 1s", 50.0)

        assert node.deadline() is None
        assert node.expire(1000.0) is False
        assert node.observe(False, "x", 1001.0) is False

    def test_window_restarts_when_the_node_comes_back(self) -> None:
        """A node UP again after rise successes opens its next window from its last success,
        not from the answer before it went DOWN."""
        node = self.node()
        node.observe(False, "x", 1.0)
        assert node.expire(2.5) is True
        for t in (5.0, 6.0, 7.0):
            node.observe(True, "ok", t)
        node.observe(False, "x", 8.0)

        assert node.up
        assert node.deadline() == 9.5

    def test_rejects_a_window_that_is_not_positive(self) -> None:
        """down_after must be > 0 (or None)."""
        with pytest.raises(ValueError, match="down_after"):
            NodeHealth(fall=3, rise=3, down_after=0.0)


class TestClusterWindow:
    def test_cluster_goes_down_when_its_last_window_ends(self) -> None:
        """expire takes the nodes whose window ended DOWN and reports one transition, at the
        wall-clock ``now``, while windows are measured in ``mono``."""
        cluster = ClusterHealth(
            "a", [A], fall=3, rise=3, min_healthy=1, now=1000.0, down_after=2.5, mono=0.0
        )
        cluster.observe(A, False, "no answer within 1s", 1001.0, mono=1.0)

        assert cluster.deadline() == 2.5
        assert cluster.expire(1002.0, mono=2.0) == ([], None)
        gone, transition = cluster.expire(1002.6, mono=2.6)

        assert gone == [A]
        assert transition is not None
        assert transition[1] == Verdict(
            "a",
            ClusterState.DOWN,
            1002.6,
            "0/1 nodes up (min_healthy 1); http://a:8086: "
            "no good answer for 2.5s (1 check failed): no answer within 1s",
        )

    def test_deadline_is_the_earliest_node_window(self) -> None:
        """The cluster's deadline is the soonest end among its nodes' windows."""
        cluster = ClusterHealth(
            "a", [A, B], fall=3, rise=3, min_healthy=1, down_after=2.5, mono=0.0
        )
        cluster.observe(A, True, "ok", 0.0, mono=1.0)
        cluster.observe(A, False, "x", 0.0, mono=2.0)
        cluster.observe(B, False, "x", 0.0, mono=2.0)

        assert cluster.deadline() == 2.5  # B's last good answer is the start (0.0)

    def test_new_nodes_start_their_window_when_added(self) -> None:
        """A node added by set_nodes (cluster without history: UP) counts from then."""
        cluster = ClusterHealth("a", [A], fall=3, rise=3, min_healthy=1, down_after=2.5, mono=0.0)
        cluster.set_nodes([A, B], now=0.0, mono=10.0)
        cluster.observe(B, False, "x", 0.0, mono=11.0)

        assert cluster.node(B).deadline() == 12.5

    def test_without_mono_the_window_uses_now(self) -> None:
        """Callers with one clock pass only ``now``."""
        cluster = ClusterHealth("a", [A], fall=3, rise=3, min_healthy=1, now=0.0, down_after=2.5)
        cluster.observe(A, False, "x", 1.0)

        assert cluster.expire(2.5)[0] == [A]


def test_redact_url_strips_userinfo_and_query() -> None:
    """redact_url keeps scheme, host, port and path only."""
    assert redact_url("https://u:p@h:8086/influx?p=x#f") == "https://h:8086/influx"

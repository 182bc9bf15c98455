"""The failover policy: one behaviour per test, no Kafka or InfluxDB."""

from __future__ import annotations

from router.policy import Activate, ClusterView, Deactivate, RouteView, StartFrom, decide

UP = ClusterView(healthy=True)
DOWN = ClusterView(healthy=False, reason="3/3 probes failed")
DRAINED = ClusterView(healthy=True, drained=True)
FAILOVER = RouteView("r", "failover", ("a", "b", "c"), handback_lag=100)
MIRROR = RouteView("m", "mirror", ("a", "b", "c"))


def test_steady_state_activates_only_the_primary() -> None:
    """With every cluster up and nothing active, only the primary starts, from its own offsets."""
    assert decide(FAILOVER, {"a": UP, "b": UP, "c": UP}, frozenset()) == [
        Activate("a", StartFrom.OWN, "a usable again")
    ]


def test_steady_state_is_stable() -> None:
    """An active healthy primary needs no action."""
    assert decide(FAILOVER, {"a": UP, "b": UP, "c": UP}, frozenset({"a"})) == []


def test_primary_down_fails_over_to_first_standby_abruptly() -> None:
    """A down primary is paused at once (not gracefully) and the first standby takes over."""
    actions = decide(FAILOVER, {"a": DOWN, "b": UP, "c": UP}, frozenset({"a"}))
    assert actions == [
        Deactivate("a", graceful=False, reason="a down: 3/3 probes failed"),
        Activate("b", StartFrom.TAKEOVER, "a down: 3/3 probes failed"),
    ]


def test_drained_primary_hands_over_gracefully() -> None:
    """A drained but healthy primary flushes and commits before the standby starts."""
    actions = decide(FAILOVER, {"a": DRAINED, "b": UP, "c": UP}, frozenset({"a"}))
    assert actions == [
        Deactivate("a", graceful=True, reason="a drained"),
        Activate("b", StartFrom.TAKEOVER, "a drained"),
    ]


def test_second_standby_used_when_first_is_down_too() -> None:
    """The first usable cluster in declared order is the target."""
    actions = decide(FAILOVER, {"a": DOWN, "b": DOWN, "c": UP}, frozenset({"b"}))
    assert actions[0] == Deactivate("b", graceful=False, reason="b down: 3/3 probes failed")
    assert actions[1].cluster == "c"
    assert isinstance(actions[1], Activate)
    assert actions[1].start is StartFrom.TAKEOVER


def test_returning_primary_replays_while_standby_keeps_serving() -> None:
    """The primary resumes from its own offsets; the standby is not stopped yet."""
    actions = decide(FAILOVER, {"a": UP, "b": UP, "c": UP}, frozenset({"b"}))
    assert actions == [Activate("a", StartFrom.OWN, "a usable again")]


def test_standby_keeps_serving_while_primary_lags() -> None:
    """The standby stays active while the primary's lag is above the threshold."""
    assert decide(FAILOVER, {"a": UP, "b": UP}, frozenset({"a", "b"}), primary_lag=101) == []


def test_standby_hands_back_once_primary_caught_up() -> None:
    """When the primary's lag is at most handback_lag the standby stops gracefully."""
    actions = decide(FAILOVER, {"a": UP, "b": UP}, frozenset({"a", "b"}), primary_lag=100)
    assert actions == [Deactivate("b", graceful=True, reason="a caught up (lag 100)")]


def test_unknown_lag_never_hands_back() -> None:
    """Without a lag figure the standby keeps serving (no guess)."""
    assert decide(FAILOVER, {"a": UP, "b": UP}, frozenset({"a", "b"}), primary_lag=None) == []


def test_skip_missed_primary_starts_from_takeover_offsets() -> None:
    """With skip_missed the returning primary jumps forward instead of replaying."""
    route = RouteView("r", "failover", ("a", "b"), skip_missed=True)
    actions = decide(route, {"a": UP, "b": UP}, frozenset({"b"}))
    assert actions == [Activate("a", StartFrom.SKIP, "a usable again")]


def test_everything_down_pauses_everything() -> None:
    """With no usable cluster, the active one is paused and nothing starts."""
    actions = decide(FAILOVER, {"a": DOWN, "b": DOWN, "c": DOWN}, frozenset({"a"}))
    assert actions == [Deactivate("a", graceful=False, reason="a down: 3/3 probes failed")]


def test_standby_failing_during_replay_is_paused_first() -> None:
    """A standby that goes down while the primary replays is paused; the primary continues."""
    actions = decide(FAILOVER, {"a": UP, "b": DOWN}, frozenset({"a", "b"}), primary_lag=5000)
    assert actions == [Deactivate("b", graceful=False, reason="b down: 3/3 probes failed")]


def test_unknown_cluster_counts_as_down() -> None:
    """A cluster missing from the views is treated as down, never as up."""
    actions = decide(FAILOVER, {"b": UP}, frozenset({"a"}))
    assert actions == [
        Deactivate("a", graceful=False, reason="a down: unknown cluster"),
        Activate("b", StartFrom.TAKEOVER, "a down: unknown cluster"),
    ]


def test_mirror_activates_every_usable_cluster() -> None:
    """In mirror mode every usable cluster receives everything from its own offsets."""
    actions = decide(MIRROR, {"a": UP, "b": DOWN, "c": UP}, frozenset())
    assert actions == [
        Activate("a", StartFrom.OWN, "a usable"),
        Activate("c", StartFrom.OWN, "c usable"),
    ]


def test_mirror_pauses_only_the_down_cluster() -> None:
    """In mirror mode a down cluster is paused while the others keep going."""
    actions = decide(MIRROR, {"a": UP, "b": DOWN, "c": UP}, frozenset({"a", "b", "c"}))
    assert actions == [Deactivate("b", graceful=False, reason="b down: 3/3 probes failed")]

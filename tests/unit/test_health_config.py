"""The topology's ``health:`` section: the down_after window, its default and its bound."""

from __future__ import annotations

import pytest

from router.errors import ConfigError
from router.topology import load_topology, parse_topology
from tests.unit.test_topology import MINIMAL, REPO


def health(section: str) -> str:
    return MINIMAL + f"health: {section}\n"


def test_default_window_is_interval_plus_timeout_plus_half_a_second() -> None:
    """Without down_after the window is interval + timeout + 0.5 s: 2.5 s with the defaults."""
    assert parse_topology(MINIMAL).health.window == 2.5
    slow = parse_topology(health("{interval: 1s, timeout: 8s}"))
    assert slow.health.window == 9.5  # a slow node's answers may take 8 s: no early DOWN


def test_explicit_down_after_wins() -> None:
    """down_after as written is the window."""
    assert parse_topology(health("{down_after: 4s}")).health.window == 4.0


def test_down_after_not_longer_than_interval_is_refused() -> None:
    """A window no longer than a probe interval would take a node DOWN on one failed check:
    refused, naming the key and its line."""
    with pytest.raises(ConfigError) as caught:
        parse_topology(health("{interval: 2s, down_after: 2s}"), source="t.yaml")

    assert caught.value.errors == [
        "health.down_after: must be longer than interval (2s), "
        "or one failed check takes a node down (line 16)"
    ]


def test_the_example_topology_uses_the_default_window() -> None:
    """topology.yaml (the commented example) leaves down_after at its default, 2.5 s."""
    topology = load_topology(REPO / "topology.yaml")

    assert topology.health.window == 2.5

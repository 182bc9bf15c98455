"""Pure parts of the devstack: ports and endpoints."""

from __future__ import annotations

import pytest

from devstack import stack


def test_endpoints_name_every_server_on_loopback() -> None:
    """Every endpoint the tests rely on is present and bound to 127.0.0.1."""
    env = stack.endpoints()
    for key in (
        "KAFKA_BOOTSTRAP",
        "INFLUX_A_URL",
        "INFLUX_B_URL",
        "INFLUX_C_URL",
        "INFLUX_A_PROXY_URL",
        "INFLUX_B_PROXY_URL",
        "INFLUX_C_PROXY_URL",
        "TOXIPROXY_URL",
    ):
        assert "127.0.0.1:" in env[key]


def test_port_offset_shifts_every_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """FROUTER_PORT_OFFSET moves the whole block of ports so a second stack fits beside."""
    monkeypatch.setenv("FROUTER_PORT_OFFSET", "0")
    base = stack.ports()
    monkeypatch.setenv("FROUTER_PORT_OFFSET", "100")
    shifted = stack.ports()
    assert {k: v - 100 for k, v in shifted.items()} == base


def test_bad_port_offset_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-numeric offset is refused with a StackError naming the variable."""
    monkeypatch.setenv("FROUTER_PORT_OFFSET", "lots")
    with pytest.raises(stack.StackError, match="FROUTER_PORT_OFFSET"):
        stack.ports()

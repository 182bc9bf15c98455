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


def test_influx_d_and_victoriametrics_follow_the_port_scheme(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """influx-d sits after influx-c (HTTP, RPC, proxy), VictoriaMetrics on 18428 / 28428."""
    monkeypatch.setenv("FROUTER_PORT_OFFSET", "0")
    p = stack.ports()
    assert (p["influx_d"], p["influx_d_rpc"], p["influx_d_proxy"]) == (18089, 18189, 28089)
    assert (p["victoriametrics"], p["victoriametrics_proxy"]) == (18428, 28428)
    assert len(set(p.values())) == len(p)
    env = stack.endpoints()
    assert env["INFLUX_D_PROXY_URL"] == "http://127.0.0.1:28089"
    assert env["INFLUX_D_PROXY_NAME"] == "influx_d"
    assert env["INFLUX_D_USERNAME"] and env["INFLUX_D_PASSWORD"]
    assert env["VICTORIAMETRICS_PROXY_URL"] == "http://127.0.0.1:28428"


def test_victoriametrics_is_optional() -> None:
    """VictoriaMetrics is a known server that only starts when asked; unknown names refused."""
    assert "victoriametrics" in [svc.name for svc in stack.services()]
    assert stack.OPTIONAL == ("victoriametrics",)
    with pytest.raises(stack.StackError, match="no optional server named nosuch"):
        stack.up(with_=("nosuch",))

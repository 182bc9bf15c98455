"""The alert rules file, proven with the real promtool: it parses (`check rules`) and every
alert fires and resolves as its unit tests say (`test rules`). Needs promtool (./dev setup)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from devstack.tools import tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "failover-router" / "files" / "alerts.yaml"
RULE_TESTS = ROOT / "tests" / "alerts" / "alerts_test.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("promtool")), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the file and finds every alert."""
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout, out.stdout


def test_promtool_test_rules() -> None:
    """`promtool test rules`: each alert fires on the series a router exposes in its situation
    (once per datacenter, not per replica), with its labels and annotations, and resolves."""
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout

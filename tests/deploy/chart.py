"""Run the pinned helm on the chart and read what it renders."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from devstack.tools import helm_env, tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "failover-router"
EXAMPLES = sorted((ROOT / "helm" / "examples").glob("*.yaml"))
KUBE_VERSION = "1.31.0"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """helm with its cache, config and data dirs private to the project's cache."""
    return subprocess.run(
        [str(tool("helm")), *args],
        capture_output=True,
        text=True,
        env=helm_env(),
        timeout=120,
        check=False,
    )


def template(
    values: Iterable[Path] = (), sets: Iterable[str] = (), release: str = "frouter"
) -> subprocess.CompletedProcess[str]:
    args = ["template", release, str(CHART), "--namespace", "metrics"]
    args += ["--kube-version", KUBE_VERSION]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return helm(*args)


def render(values: Iterable[Path] = (), sets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The rendered objects; fails the test with helm's message if rendering fails."""
    out = template(values, sets)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]

"""Where the pinned command-line tools built by ``devstack/install.sh`` live.

Each is ``$FROUTER_CACHE/bin/NAME-VERSION``; the version is read from the script that builds it
(one place to bump it). A missing tool is a ``ToolMissing`` error naming the command that
installs it: tests that need a tool fail, they never skip.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from devstack.stack import cache_dir

HERE = Path(__file__).resolve().parent

# tool name -> (script that pins it, its version variable)
_PINS = {
    "helm": ("build-chart-tools.sh", "HELM_VERSION"),
    "helm-unittest": ("build-chart-tools.sh", "HELM_UNITTEST_VERSION"),
    "prometheus": ("build-chart-tools.sh", "PROMETHEUS_VERSION"),
    "promtool": ("install.sh", "PROMTOOL_VERSION"),
}


class ToolMissing(Exception):
    """A pinned tool is not built yet."""


def version(name: str) -> str:
    script, var = _PINS[name]
    text = (HERE / script).read_text()
    match = re.search(rf"^{var}=(\S+)", text, re.MULTILINE)
    if match is None:
        raise ToolMissing(f"devstack/{script} does not pin {var}")
    return match[1]


def tool(name: str) -> Path:
    """The path of a pinned tool; raises ToolMissing if it is not built."""
    path = cache_dir() / "bin" / f"{name}-{version(name)}"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolMissing(f"{path} is missing: run ./dev setup (devstack/install.sh builds it)")
    return path


def helm_env() -> dict[str, str]:
    """The environment for helm: its cache, config and data in a private dir of the cache."""
    home = cache_dir() / "helm"
    env = dict(os.environ)
    for key, sub in (
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ):
        env[key] = str(home / sub)
    return env

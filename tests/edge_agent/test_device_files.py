"""The Raspberry Pi unit and config template are usable as shipped."""

from __future__ import annotations

import configparser
from pathlib import Path

from edge_agent.config import load_config

DEVICE = Path(__file__).resolve().parents[2] / "devices" / "raspberry-pi"


def test_systemd_unit_runs_unprivileged_and_restarts() -> None:
    """The unit runs as a non-root user, restarts on failure and stops with SIGTERM."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEVICE / "edgefleet-agent.service")
    svc = unit["Service"]
    assert svc["User"] not in ("", "root")
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["ExecStart"].endswith("edgefleet agent run")
    assert "ReadWritePaths" in svc and svc["ProtectSystem"] == "strict"


def test_config_template_loads() -> None:
    """The shipped agent.toml validates, with privacy off and the API on loopback."""
    cfg = load_config(DEVICE / "agent.toml", environ={})
    assert cfg.data_dir == Path("/var/lib/edgefleet")
    assert cfg.http.host == "127.0.0.1"
    assert cfg.privacy.sample_inputs is False

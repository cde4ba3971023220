"""kill -9 never corrupts the agent's database and never loses a committed window."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import sys
    import numpy as np
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, TelemetryConfig
    data_dir, key, bundle = sys.argv[1:4]
    cfg = AgentConfig(data_dir=data_dir, trusted_keys=[key], bundle=bundle,
                      telemetry=TelemetryConfig(window_seconds=1, flush_interval_seconds=0.02))
    agent = Agent(cfg)
    rng = np.random.default_rng()
    print("ready", flush=True)
    while True:
        agent.predict(rng.normal(size=(int(rng.integers(1, 8)), 6)).astype(np.float32))
""")


def _closed_windows(db: Path) -> dict[tuple[float, str], tuple[bytes, bytes, int]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT start, model_version, inputs, outputs, rows FROM windows WHERE closed = 1"
        ).fetchall()
    except sqlite3.OperationalError:  # not created yet
        rows = []
    finally:
        conn.close()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def test_kill_minus_nine_keeps_database_whole(tmp_path: Path, keypair: Any,
                                              small_bundle: Any) -> None:
    """Killed with SIGKILL at random points, the agent restarts on an intact database in
    which every window that was committed before the kill is still there, unchanged."""
    data = tmp_path / "data"
    db = data / "agent.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(42)
    committed: dict[tuple[float, str], tuple[bytes, bytes, int]] = {}
    for _round in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(data), str(keypair.public_path),
             str(small_bundle.path)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            before = len(committed)
            _wait(lambda b=before: len(_closed_windows(db)) > b, 30, "a window to close")
            time.sleep(rng.uniform(0.0, 1.0))  # a random kill point, not a synchronisation
            committed = _closed_windows(db)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
        after = _closed_windows(db)
        for key, value in committed.items():
            assert after.get(key) == value, f"committed window {key} lost or changed"
    assert len(committed) >= 6

"""Broker SIGKILL and restart, hub SIGKILL and restart, and both at once, while a real agent
serves and syncs: at the end the hub holds every window the agent closed, exactly once.

The agent runs in this process (serving from a thread, 1-second windows); the broker is a real
Mosquitto, the hub a real `edgefleet hub serve` process on a SQLite store. Each outage lasts
until the agent has closed more windows while it could not deliver them.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Hub:
    """`edgefleet hub serve` as a child process that can be SIGKILLed and started again."""

    def __init__(self, db: Path, broker_url: str, log: Path) -> None:
        self.argv = [sys.executable, "-m", "edgefleet", "hub", "serve", "--db",
                     f"sqlite:///{db}", "--broker", broker_url, "--client-id", "hub-restarts"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _hub_windows(db: Path, device: str) -> list[tuple[float, str, int]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [tuple(r) for r in conn.execute(
            "SELECT start, model_version, rows FROM windows WHERE device_id = ?", [device])]
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


def test_broker_and_hub_restarts_lose_and_double_nothing(tmp_path: Path, keypair: Any,
                                                         small_bundle: Any,
                                                         mosquitto: Any) -> None:
    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from edge_agent.outbox import outbox_status

    device = "restarts-1"
    config_path = tmp_path / "agent.toml"
    config_path.write_text("\n".join([
        f'device_id = "{device}"', f'data_dir = "{tmp_path / "agent"}"',
        f'trusted_keys = ["{keypair.public_path}"]', f'bundle = "{small_bundle.path}"',
        "[http]", "enabled = false",
        "[telemetry]", "window_seconds = 1", "flush_interval_seconds = 0.05",
        "[sync]", f'broker_url = "{mosquitto.url}"', "resend_after_seconds = 2",
        "backoff_base_seconds = 0.1", "backoff_cap_seconds = 1", "poll_seconds = 0.1", "",
    ]), encoding="utf-8")
    hub_db = tmp_path / "hub.db"
    hub = Hub(hub_db, mosquitto.url, tmp_path / "hub.log")
    hub.start()
    agent = Agent(load_config(config_path))
    stop = threading.Event()
    served = [0]

    def serve() -> None:
        rng = np.random.default_rng(3)
        while not stop.is_set():
            agent.predict(rng.normal(size=(4, 6)).astype(np.float32))
            served[0] += 4
            time.sleep(0.001)

    def closed() -> int:
        return len(agent.store.windows(closed=True))

    def more_windows(n: int = 2) -> None:
        target = closed() + n
        _wait(lambda: closed() >= target, 30, f"{n} more closed windows")

    def hub_has_all() -> bool:
        return len(_hub_windows(hub_db, device)) >= closed()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        more_windows()
        _wait(hub_has_all, 30, "the hub to catch up before the first outage")
        # 1: the broker dies (SIGKILL: no persistence save) and comes back
        mosquitto.kill()
        more_windows()
        mosquitto.start()
        more_windows()
        # 2: the hub dies and comes back
        hub.kill()
        more_windows()
        hub.start()
        more_windows()
        # 3: both at once
        hub.kill()
        mosquitto.kill()
        more_windows(3)
        mosquitto.start()
        hub.start()
        more_windows()
        stop.set()
        server.join(timeout=10)
        agent.flush(close_all=True)
        assert agent.sync is not None
        agent.sync.notify()
        _wait(lambda: outbox_status(agent.store).rows == 0, 90, "the outbox to drain")
        agent_windows = {(w.start, w.model_version): w.rows
                         for w in agent.store.windows(closed=True)}
        assert agent.store.integrity_ok()
    finally:
        stop.set()
        agent.close()
        hub.stop()
    hub_rows = _hub_windows(hub_db, device)
    hub_windows = {(start, version): rows for start, version, rows in hub_rows}
    assert len(hub_windows) == len(hub_rows), "a window stored twice at the hub"
    assert hub_windows == agent_windows
    assert sum(agent_windows.values()) == served[0]
    assert len(agent_windows) >= 14

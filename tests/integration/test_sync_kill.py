"""kill -9 of agents while they produce and sync: the hub holds every committed window once.

Two devices run at once against one real Mosquitto and one hub worker (SQLite store). Each
agent process serves predictions as fast as it can (1-second telemetry windows, so windows
close and sync all the time) and is killed with SIGKILL at random points — during start-up,
while serving, while its publisher has a batch in flight — then started again on the same data
dir. After the last kill each agent runs once more with nothing to serve until its outbox is
empty. Then, per device: the agent database passes ``PRAGMA integrity_check``; every window the
agent committed as closed is at the hub exactly once with the same rows; the hub holds no
window the agent did not commit, and its receipt cursor equals the agent's last sequence.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KILLS_PER_DEVICE = int(os.environ.get("EDGEFLEET_SYNC_KILLS", "26"))  # 2 devices: >= 50 in CI

DRIVER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from edge_agent.outbox import outbox_status
    config_path, mode = sys.argv[1:3]
    agent = Agent(load_config(config_path))
    print("ready", flush=True)
    if mode == "serve":
        rng = np.random.default_rng()
        while True:
            agent.predict(rng.normal(size=(int(rng.integers(1, 8)), 6)).astype(np.float32))
            time.sleep(0.0005)
    # drain: close every window, then wait until the hub has receipted everything
    agent.flush(close_all=True)
    agent.sync.notify()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if outbox_status(agent.store).rows == 0:
            break
        time.sleep(0.05)
    rows = outbox_status(agent.store).rows
    agent.close()
    print("drained" if rows == 0 else f"not drained: {rows} rows left", flush=True)
""")


def _config(path: Path, device: str, data: Path, key: Path, bundle: Path, port: int) -> Path:
    path.write_text("\n".join([
        f'device_id = "{device}"', f'data_dir = "{data}"', f'trusted_keys = ["{key}"]',
        f'bundle = "{bundle}"',
        "[http]", "enabled = false",
        "[telemetry]", "window_seconds = 1", "flush_interval_seconds = 0.05",
        "[sync]", f'broker_url = "mqtt://127.0.0.1:{port}"', "resend_after_seconds = 2",
        "backoff_base_seconds = 0.1", "backoff_cap_seconds = 1", "poll_seconds = 0.1",
        "max_batch_items = 5", "",
    ]), encoding="utf-8")
    return path


def _agent_windows(db: Path) -> dict[tuple[float, str], int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute(
            "SELECT start, model_version, rows FROM windows WHERE closed = 1").fetchall()
        last_seq, receipt = conn.execute(
            "SELECT last_seq, last_receipt_seq FROM outbox_meta WHERE id = 1").fetchone()
    finally:
        conn.close()
    out = {(r[0], r[1]): r[2] for r in rows}
    assert receipt == last_seq, f"the hub receipted {receipt} of {last_seq} batches"
    out[(-1.0, "last_seq")] = int(last_seq)
    return out


def _run_device(device: str, config: Path, env: dict[str, str], seed: int,
                failures: list[str]) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(KILLS_PER_DEVICE):
            proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(config), "serve"],
                                    env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            try:
                # A random kill point (not a synchronisation: where it lands is the point):
                # one time in five during start-up, otherwise up to a few windows into serving.
                if rng.random() < 0.2:
                    time.sleep(rng.uniform(0.1, 1.5))
                else:
                    assert proc.stdout is not None
                    if proc.stdout.readline().strip() != "ready":
                        raise AssertionError(f"agent exited with {proc.wait()} before ready")
                    time.sleep(rng.uniform(0.2, 2.5))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                if proc.stdout is not None:
                    proc.stdout.close()
        drain = subprocess.run([sys.executable, "-c", DRIVER, str(config), "drain"], env=env,
                               capture_output=True, text=True, timeout=120, cwd=ROOT)
        if "drained" not in drain.stdout.splitlines()[-1:]:
            failures.append(f"{device}: drain failed: {drain.stdout[-500:]} "
                            f"{drain.stderr[-2000:]}")
    except Exception as err:
        failures.append(f"{device}: {err!r}")


def test_kill_nine_while_syncing_loses_and_doubles_nothing(tmp_path: Path, keypair: Any,
                                                          small_bundle: Any,
                                                          mosquitto: Any) -> None:
    from cloud_hub.store import HubStore
    from cloud_hub.worker import HubWorker

    hub_db = tmp_path / "hub.db"
    store = HubStore(f"sqlite:///{hub_db}")
    worker = HubWorker(store, broker_url=mosquitto.url, client_id="hub-under-test")
    worker.start()
    assert worker.wait_subscribed(10)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    devices = ("kill-a", "kill-b")
    configs = {d: _config(tmp_path / f"{d}.toml", d, tmp_path / d, keypair.public_path,
                          small_bundle.path, mosquitto.port) for d in devices}
    failures: list[str] = []
    threads = [threading.Thread(target=_run_device, args=(d, configs[d], env, i, failures))
               for i, d in enumerate(devices)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not failures, failures
        worker_stats = worker.stats()
    finally:
        worker.stop()
    try:
        for device in devices:
            agent = _agent_windows(tmp_path / device / "agent.db")
            last_seq = agent.pop((-1.0, "last_seq"))
            with sqlite3.connect(hub_db) as conn:
                hub_rows = conn.execute(
                    "SELECT start, model_version, rows FROM windows WHERE device_id = ?",
                    [device]).fetchall()
                up_to = conn.execute("SELECT up_to_seq FROM devices WHERE device_id = ?",
                                     [device]).fetchone()[0]
            hub = {(r[0], r[1]): r[2] for r in hub_rows}
            assert len(hub) == len(hub_rows), f"{device}: a window stored twice at the hub"
            assert len(agent) >= KILLS_PER_DEVICE // 3, f"{device}: too few windows closed"
            assert hub == agent, (f"{device}: agent has {len(agent)} closed windows, hub "
                                  f"{len(hub)}; missing at hub {sorted(set(agent) - set(hub))[:5]}"
                                  f", extra at hub {sorted(set(hub) - set(agent))[:5]}")
            assert up_to == last_seq and last_seq > 0
        counters = store.counters()
        assert counters.conflicts == 0
        assert worker_stats["received"] >= sum(1 for _ in devices)
    finally:
        store.close()

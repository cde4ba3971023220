"""The fleet half of the demo: a broker, the hub and five agent processes on this machine.

Each agent is a separate `edgefleet agent run` process with its own data dir, HTTP port and
tags; each is fed held-out digits one request at a time over its local HTTP API, as a camera
would send them. Site ``site-c`` photographs them under brighter light. The agents close a
telemetry window every few seconds and sync it over MQTT through their SQLite outbox; the hub
(`edgefleet hub serve`, SQLite store) stores each window once and the demo then asks it for the
fleet drift table. Everything started here is stopped in a ``finally``: the demo leaves nothing
running, whatever fails.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BRIGHT_SITE", "SITES", "FleetResult", "run_fleet"]

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")
BRIGHT_SITE = "site-c"
WINDOW_SECONDS = 4.0
REQUESTS_PER_SITE = 150  # digits per site, one request each


@dataclass(frozen=True)
class FleetResult:
    #: device -> its drifted features and outputs, judged by the hub on its merged windows
    drifted: dict[str, list[str]]
    #: devices, most drifted first (the hub's ranking)
    ranking: list[str]
    #: device -> windows the hub stored from it
    windows: dict[str, int]


class _Children:
    """Every process the demo starts, stopped in reverse order however the demo ends."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stoppers: list[Callable[[], None]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; its log: "
                                   f"{_tail(self.logs / f'{name}.log')}")

    def stop_all(self, timeout: float = 20.0) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for stop in reversed(self.stoppers):
            stop()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n  ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(cond: Callable[[], bool], timeout: float, what: str,
          alive: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        if cond():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/v2/health/ready")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _feed(port: int, rows: np.ndarray, errors: list[str]) -> None:
    """POST one digit per request to /v1/predict on a keep-alive connection."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"content-type": "application/json"}
        for row in rows:
            conn.request("POST", "/v1/predict", json.dumps({"inputs": row.tolist()}), headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
        conn.close()
    except Exception as err:  # reported by the caller, with the port
        errors.append(f"port {port}: {err}")


def _lighting(site: str) -> str:
    return "bright" if site == BRIGHT_SITE else "normal"


def _agent_toml(site: str, data_dir: Path, key: Path, bundle: Path, http_port: int,
                broker_url: str) -> str:
    return "\n".join([
        f'device_id = "{site}"',
        f'data_dir = "{data_dir}"',
        f'trusted_keys = ["{key}"]',
        f'bundle = "{bundle}"',
        f'tags = {{ site = "{site}", lighting = "{_lighting(site)}" }}',
        "[http]",
        f"port = {http_port}",
        "[telemetry]",
        f"window_seconds = {WINDOW_SECONDS}",
        "flush_interval_seconds = 0.5",
        "[sync]",
        "enabled = true",
        f'broker_url = "{broker_url}"',
        "",
    ])


def run_fleet(workdir: Path, bundle: Path, keys_dir: Path, images: np.ndarray,
              say: Callable[..., Any], *,
              brighten: Callable[[np.ndarray], np.ndarray] | None = None,
              requests_per_site: int = REQUESTS_PER_SITE) -> FleetResult:
    """Run broker, hub and five agents; feed them; print and return the hub's fleet drift."""
    import shutil

    from cloud_hub.fleet_drift import fleet_drift, format_fleet_drift
    from cloud_hub.mosquitto import BrokerError, MosquittoProcess, free_port
    from cloud_hub.store import HubStore
    from edgefleet.demo import brighter

    brighten = brighten or brighter
    fleet_dir = workdir / "fleet"
    shutil.rmtree(fleet_dir, ignore_errors=True)
    logs = fleet_dir / "logs"
    logs.mkdir(parents=True)
    public_key = keys_dir / "edgefleet.pub"
    children = _Children(logs)
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(workdir / "numba-cache"))
    edgefleet = [sys.executable, "-m", "edgefleet"]
    t0 = time.perf_counter()
    try:
        try:
            broker: Any = MosquittoProcess(fleet_dir / "broker").start()
            children.stoppers.append(broker.stop)
            broker_kind = "Mosquitto"
        except BrokerError:
            from cloud_hub.embedded_broker import EmbeddedBroker

            broker = EmbeddedBroker()
            broker.start()
            children.stoppers.append(broker.stop)
            broker_kind = "embedded amqtt (Mosquitto is not installed)"
        broker_url = f"mqtt://127.0.0.1:{broker.port}"
        say(f"== fleet: {broker_kind} broker on {broker_url}")

        db_url = f"sqlite:///{fleet_dir / 'hub' / 'hub.db'}"
        (fleet_dir / "hub").mkdir()
        store = HubStore(db_url)
        try:
            store.add_bundle(bundle, trusted_keys=[public_key])
        finally:
            store.close()
        children.spawn("hub", [*edgefleet, "hub", "serve", "--db", db_url, "--broker",
                               broker_url], env)
        say(f"   hub: `edgefleet hub serve` storing into {db_url}")

        ports: dict[str, int] = {}
        for site in SITES:
            data_dir = fleet_dir / "agents" / site
            data_dir.mkdir(parents=True)
            ports[site] = free_port()
            config = data_dir / "agent.toml"
            config.write_text(_agent_toml(site, data_dir, public_key, bundle, ports[site],
                                          broker_url), encoding="utf-8")
            children.spawn(site, [*edgefleet, "agent", "run", "--config", str(config)], env)
        _wait(lambda: all(_ready(p) for p in ports.values()), 90, "5 agents to serve",
              children.check_alive)
        say(f"   5 agents serving (separate processes, own data dirs) after "
            f"{time.perf_counter() - t0:.1f}s: " + ", ".join(
                f"{s}{' (brighter light)' if s == BRIGHT_SITE else ''}" for s in SITES))

        rng = np.random.default_rng(7)
        errors: list[str] = []
        threads = []
        # the quiet sites see disjoint draws of the field digits; the bright site any draw
        order = rng.permutation(len(images))
        quiet = [s for s in SITES if s != BRIGHT_SITE]
        if len(images) < len(quiet) * requests_per_site:
            raise ValueError(f"{len(images)} field digits cannot give {len(quiet)} sites "
                             f"{requests_per_site} each")
        for site in SITES:
            if site == BRIGHT_SITE:
                rows = brighten(images[rng.permutation(len(images))[:requests_per_site]])
            else:
                k = quiet.index(site)
                rows = images[order[k * requests_per_site:(k + 1) * requests_per_site]]
            threads.append(threading.Thread(target=_feed, args=(ports[site], rows, errors)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError("feeding the agents failed: " + "; ".join(errors))
        say(f"   fed {requests_per_site} digits to each agent, one HTTP request per digit")

        store = HubStore(db_url)
        try:
            def all_rows_in() -> bool:
                got = store.rows_by_device(model_name="digits")
                return all(got.get(s, 0) >= requests_per_site for s in SITES)

            _wait(all_rows_in, 90, "the hub to store every device's windows",
                  children.check_alive)
            say(f"   the hub stored every window from every device "
                f"({time.perf_counter() - t0:.1f}s since the broker started)\n")
            until = time.time() + 60
            report = fleet_drift(store, model_name="digits", model_version="1.0.0",
                                 since=0.0, until=until)
            say(_short_table(format_fleet_drift(report, top=5)))
            # each site on its own: which of its features drift
            drifted = {site: fleet_drift(store, model_name="digits", model_version="1.0.0",
                                         since=0.0, until=until, selector=f"site={site}").drifted
                       for site in SITES}
            windows = store.windows_by_device(model_name="digits")
        finally:
            store.close()
    finally:
        children.stop_all()
    return FleetResult(drifted=drifted, ranking=[d.device_id for d in report.devices],
                       windows=windows)


def _short_table(table: str, keep: int = 8) -> str:
    """The fleet table with only its drifted feature rows (64 pixels make a long table)."""
    lines = table.splitlines()
    head = 3
    end = next(i for i, line in enumerate(lines) if " drifted" in line and " of " in line)
    rows = [line for line in lines[head:end] if line.rstrip().endswith("DRIFT")]
    shown = rows[:keep] + ([f"... {len(rows) - keep} more drifted rows"]
                           if len(rows) > keep else [])
    return "\n".join(lines[:head] + shown + lines[end:])

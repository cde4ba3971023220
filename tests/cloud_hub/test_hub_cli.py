"""`edgefleet hub serve` and `edgefleet hub add-bundle`: config, errors, signals, the embedded
broker and several workers in one process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from cloud_hub.cli import hub, run_hub
from cloud_hub.config import HubConfigError, load_config
from cloud_hub.mosquitto import MosquittoProcess, free_port
from cloud_hub.store import HubStore
from tests.cloud_hub.test_worker import FleetSim, assert_exactly_once, fleet_factory, wait_for

__all__ = ["fleet_factory"]  # a fixture, re-exported for the tests below

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(hub, list(args), env=env)


def error_line(result: Any) -> str:
    """The one `error:` line a failed command prints (and nothing else on stderr)."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return str(lines[0])


# --- configuration ---------------------------------------------------------------------------


def test_config_layers_file_then_environment_then_flags(tmp_path: Path) -> None:
    """TOML file < EDGEFLEET_HUB_* environment < CLI flags; unset flags change nothing."""
    path = tmp_path / "hub.toml"
    path.write_text('db = "/srv/hub.db"\n[broker]\nurl = "mqtt://file:1883"\ngroup = "g1"\n'
                    "[ingest]\nbatch_max = 100\n", encoding="utf-8")
    env = {"EDGEFLEET_HUB_BROKER__URL": "mqtts://env:8883", "EDGEFLEET_HUB_INGEST__WORKERS": "3",
           "EDGEFLEET_HUB_BROKER__SHARED": "true", "EDGEFLEET_AGENT_DATA_DIR": "/ignored"}
    config = load_config(path, env, overrides={"broker.group": "flag", "db": None})
    assert config.db == "/srv/hub.db"
    assert config.broker.url == "mqtts://env:8883" and config.broker.group == "flag"
    assert config.broker.shared is True and config.ingest.workers == 3
    assert config.ingest.batch_max == 100
    default = load_config(None, {})
    assert default.broker.url is None and default.db is None  # quick start: embedded broker
    assert default.broker.mqtt_version == "auto" and default.embedded_broker.port == 1883


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("[broker]\nurl = \"http://x\"\n", {}, "config key broker.url = 'http://x'"),
    ("", {"EDGEFLEET_HUB_INGEST__BATCH_MAX": "0"}, "config key ingest.batch_max = 0"),
    ("[broker]\ncolour = \"red\"\n", {}, "config key broker.colour"),
    ("[broker]\nmqtt_version = 4\n", {}, "config key broker.mqtt_version"),
    ("[broker]\nurl = \"mqtt://h\"\nca_certs = \"/ca.pem\"\n", {}, "is not mqtts://"),
    ("[broker]\npassword = \"a\"\npassword_file = \"/p\"\n", {}, "not both"),
    ("db = \"mysql://h/db\"\n", {}, "config key db = 'mysql://h/db'"),
    ("[embedded_broker]\nhost = \"0.0.0.0\"\n", {}, "config key embedded_broker.host"),
    ("[broker\n", {}, "is not valid TOML"),
])
def test_config_errors_name_the_key_and_the_value(tmp_path: Path, text: str,
                                                  env: dict[str, str], expected: str) -> None:
    """Every bad setting is refused with the key, the bad value and what was expected."""
    path = tmp_path / "hub.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(HubConfigError, match=re.escape(expected)):
        load_config(path, env)


def test_password_file_is_read_and_a_missing_one_named(tmp_path: Path) -> None:
    """broker.password_file's first line is the password; an unreadable file is a config error."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n", encoding="utf-8")
    config = load_config(None, {"EDGEFLEET_HUB_BROKER__PASSWORD_FILE": str(secret)})
    assert config.broker.password_text() == "s3cret"
    config = load_config(None, {"EDGEFLEET_HUB_BROKER__PASSWORD_FILE": str(tmp_path / "no")})
    with pytest.raises(HubConfigError, match=r"broker\.password_file"):
        config.broker.password_text()
    config = load_config(None, {"EDGEFLEET_HUB_BROKER__PASSWORD": "hunter2"})
    assert "hunter2" not in repr(config) and config.broker.password_text() == "hunter2"


def test_serve_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    """A bad flag value, a missing config file, several workers on the embedded broker (which
    cannot share) and a busy embedded-broker port each end with one `error:` line."""
    line = error_line(invoke("serve", "--broker", "mqtt://", "--db", str(tmp_path / "h.db")))
    assert "broker.url" in line and "names no host" in line
    line = error_line(invoke("serve", "--config", str(tmp_path / "missing.toml")))
    assert "does not exist" in line
    line = error_line(invoke("serve", "--workers", "2", "--db", str(tmp_path / "h.db")))
    assert "ingest.workers = 2" in line and "shared subscriptions" in line
    with MosquittoProcess(tmp_path / "busy") as busy:  # something already on the port
        line = error_line(invoke("serve", "--db", str(tmp_path / "h.db"),
                                 env={"EDGEFLEET_HUB_EMBEDDED_BROKER__PORT": str(busy.port)}))
    assert "embedded broker cannot listen" in line


# --- add-bundle --------------------------------------------------------------------------------


def test_add_bundle_verifies_and_stores(tmp_path: Path, small_bundle: Any, keypair: Any,
                                        other_keypair: Any) -> None:
    """A bundle signed by the trusted key is added (twice is a no-op); against another key it is
    refused with one error line and nothing is stored."""
    db = tmp_path / "hub.db"
    path = str(small_bundle.path)
    result = invoke("add-bundle", path, "--trusted-key", str(keypair.public_path), "--db", str(db))
    assert result.exit_code == 0, result.output
    assert "added bundle small 1.2.0" in result.stdout
    assert invoke("add-bundle", path, "--trusted-key", str(keypair.public_path),
                  "--db", str(db)).exit_code == 0
    line = error_line(invoke("add-bundle", path, "--trusted-key", str(other_keypair.public_path),
                             "--db", f"sqlite:///{tmp_path / 'other.db'}"))
    assert "signature does not verify" in line
    with HubStore(path=db) as store:
        assert [(b.name, b.version) for b in store.bundles()] == [("small", "1.2.0")]
    with HubStore(path=tmp_path / "other.db") as store:
        assert store.bundles() == []
    assert invoke("add-bundle", path, "--db", str(db)).exit_code == 2  # --trusted-key required


# --- serve ---------------------------------------------------------------------------------


def _serve(args: list[str], log: Path, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "edgefleet", "hub", "serve", *args],
                                stdout=out, stderr=out, env=full_env)


def _wait_subscribed(proc: subprocess.Popen[bytes], log: Path) -> None:
    def alive() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"hub serve exited with {proc.returncode}: {log.read_text()}")

    wait_for(lambda: "hub: subscribed" in log.read_text(), 60, "hub serve to subscribe",
             tick=alive)


def test_serve_with_the_embedded_broker_and_sigterm(tmp_path: Path,
                                                    fleet_factory: Callable[..., FleetSim]
                                                    ) -> None:
    """With no broker configured, `edgefleet hub serve` starts the embedded broker, says where
    it listens, ingests and receipts; SIGTERM stops it cleanly (exit 0, counters printed)."""
    port = free_port()
    config = tmp_path / "hub.toml"
    config.write_text(f'db = "{tmp_path / "hub.db"}"\n[embedded_broker]\nport = {port}\n',
                      encoding="utf-8")
    log = tmp_path / "serve.log"
    proc = _serve(["--config", str(config), "--client-id", "hub-cli"], log)
    try:
        _wait_subscribed(proc, log)
        text = log.read_text()
        assert f"embedded MQTT broker (amqtt, MQTT 3.1.1, no authentication) listening on " \
               f"mqtt://127.0.0.1:{port}" in text
        fleet = fleet_factory(f"mqtt://127.0.0.1:{port}", ["pi-1", "pi-2"],
                              protocol=mqtt.MQTTv311)
        fleet.publish_range(range(1, 6))
        wait_for(lambda: fleet.all_receipted(5), 30, "receipts from the embedded hub")
        fleet.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "hub: worker hub-cli: 10 received, 10 stored" in text
    with HubStore(path=tmp_path / "hub.db") as store:
        assert_exactly_once(store, ["pi-1", "pi-2"], 5)


def test_serve_on_mosquitto_stops_on_sigint(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """`edgefleet hub serve --broker ...` (through the top-level CLI) exits 0 on SIGINT."""
    log = tmp_path / "serve.log"
    proc = _serve(["--broker", mosquitto.url, "--db", f"sqlite:///{tmp_path / 'hub.db'}",
                   "--group", "g2"], log)
    try:
        _wait_subscribed(proc, log)
        assert "$share/g2/edgefleet/v1/+/telemetry" in log.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "hub: stopping" in log.read_text()


def test_run_hub_with_two_workers_in_one_process(mosquitto: MosquittoProcess, tmp_path: Path,
                                                 fleet_factory: Callable[..., FleetSim]) -> None:
    """ingest.workers = 2: two sessions (<client_id>-0, -1) share the subscription, each with
    its own store connection; everything is stored once and the stop reports both."""
    config = load_config(None, {}, overrides={
        "db": str(tmp_path / "hub.db"), "broker.url": mosquitto.url,
        "broker.client_id": "hub-pair", "ingest.workers": 2})
    stop, ready = threading.Event(), threading.Event()
    said: list[str] = []
    thread = threading.Thread(target=run_hub, args=(config, stop),
                              kwargs={"echo": said.append, "ready": ready})
    thread.start()
    try:
        assert ready.wait(30), said
        devices = [f"d{i}" for i in range(10)]
        fleet = fleet_factory(mosquitto.url, devices)
        fleet.publish_range(range(1, 21))
        wait_for(lambda: fleet.all_receipted(20), 30, "receipts from two workers")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    finals = [s for s in said if s.startswith("hub: worker hub-pair-")]
    assert len(finals) == 2, said
    with HubStore(path=tmp_path / "hub.db") as store:
        assert_exactly_once(store, devices, 20)

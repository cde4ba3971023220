"""The device's persistent MQTT session (issue 5): what the hub sends while the device is away
is queued by the broker and delivered when the device comes back under the same client id.

Only a persistent session does that: MQTT 5 ``clean_start=False`` with a session expiry, MQTT
3.1.1 ``clean_session=False`` (``edge_agent/sync.py``). With a clean session the broker drops
the device's subscriptions and its queue, and the command below is lost. Each test runs for both
protocol versions against a real Mosquitto, and checks three witnesses: the command reaches the
agent's command hook, the adapter logs CONNACK's session-present flag True on the reconnect, and
the broker's own log shows the device connecting with a persistent session (``c0``).

Two ways of being away:

- the link drops (a relay between device and broker is cut and held shut): the same
  :class:`~edge_agent.sync.Sync` reconnects by itself;
- the agent restarts: a clean stop (DISCONNECT), then a new Sync with the same settings.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle import key_id
from edge_agent.store import AgentStore
from edge_agent.sync import Sync
from fleet_protocol import topics
from fleet_protocol.messages import Command, StateMessage, UnsignedCommand
from fleet_protocol.wire import encode
from tests.edge_agent.test_sync import DEVICE, StateWatch, settings, start_sync, wait_for

#: the broker's log names the protocol of a CONNECT: p2 is 3.1.1, p5 is 5
BROKER_PROTOCOL = {5: "p5", 311: "p2"}
SESSION_PRESENT = re.compile(r"as (\S+) \(session present: (\w+)\)")


@pytest.fixture
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed_command(key: Ed25519PrivateKey, command_id: str, seq: int) -> Command:
    """A hub command signed as the hub signs them (Ed25519 over canonical_bytes)."""
    now = time.time()
    unsigned = UnsignedCommand(device_id=DEVICE, command_id=command_id,
                               key_id=key_id(key.public_key()), seq=seq, issued_at=now,
                               expires_at=now + 3600, kind="promote")
    return unsigned.signed(key.sign(unsigned.canonical_bytes()))


class Gate:
    """A TCP relay between the device and the broker: :meth:`cut` drops the device's
    connection and refuses new ones (accepted and closed at once) until :meth:`reopen`."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.is_open = threading.Event()
        self.is_open.set()
        self.lock = threading.Lock()
        self.live: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.refused = 0
        self._spawn(self._accept_loop)

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self.threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                device, _ = self.listener.accept()
            except OSError:  # the listener was shut down
                return
            if not self.is_open.is_set():
                with self.lock:
                    self.refused += 1
                device.close()
                continue
            try:
                broker = socket.create_connection(("127.0.0.1", self.broker_port), timeout=5)
            except OSError:
                device.close()
                continue
            broker.settimeout(None)
            with self.lock:
                self.live += [device, broker]
            self._spawn(self._pump, device, broker)
            self._spawn(self._pump, broker, device)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.is_open.clear()
        with self.lock:
            live = list(self.live)
        self._drop(*live)

    def reopen(self) -> None:
        self.is_open.set()

    def close(self) -> None:
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            threads = list(self.threads)
        for t in threads:
            t.join(5)
        with self.lock:
            for s in self.live:
                s.close()
            self.live = []


class Hub(StateWatch):
    """Stands in for the hub: publishes commands at QoS 1 (waiting for the broker's PUBACK) and
    watches the device's state topic (the broker publishes the device's will there when it
    notices the device is gone)."""

    @property
    def states(self) -> list[StateMessage]:
        return [msg for _, msg in self.seen]

    def send(self, cmd: Command) -> None:
        info = self.client.publish(topics.cmd(DEVICE), encode(cmd), qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), "the broker did not acknowledge the command"


@pytest.fixture
def hub(mosquitto: Any) -> Iterator[Hub]:
    h = Hub(mosquitto.port)
    yield h
    h.close()


def session_flags(caplog: pytest.LogCaptureFixture) -> list[str]:
    """CONNACK's session-present flag of each connect, as the adapter logged it."""
    return [m.group(2) for r in caplog.records if r.name == "edge_agent.sync"
            for m in [SESSION_PRESENT.search(r.getMessage())] if m and m.group(1) == DEVICE]


def broker_connects(mosquitto: Any) -> list[str]:
    """The "(p<protocol>, c<clean>, k<keepalive>)" of each CONNECT of the device the broker
    logged."""
    text = mosquitto.log_path.read_text(encoding="utf-8", errors="replace")
    return re.findall(rf"New client connected from \S+ as {re.escape(DEVICE)} \((p\d, c\d),",
                      text)


def broker_saw_disconnect(mosquitto: Any) -> bool:
    text = mosquitto.log_path.read_text(encoding="utf-8", errors="replace")
    return f"Client {DEVICE} disconnected." in text


def check_verified(cmd: Command, key: Ed25519PrivateKey) -> None:
    key.public_key().verify(bytes(cmd.signature), cmd.canonical_bytes())


@pytest.mark.parametrize("version", [5, 311])
def test_command_sent_while_link_is_down_arrives_on_reconnect(
        version: int, mosquitto: Any, hub: Hub, store: AgentStore, signer: Ed25519PrivateKey,
        caplog: pytest.LogCaptureFixture) -> None:
    """The device's link drops (the broker publishes its will); the hub sends a command at
    QoS 1; the link comes back and the same Sync reconnects: the broker resumes the session
    (session present) and delivers the queued command first, then one sent after."""
    caplog.set_level(logging.INFO, logger="edge_agent.sync")
    gate = Gate(mosquitto.port)
    received: list[Command] = []
    sync = start_sync(store, settings(gate.port, mqtt_version=version),
                      on_command=received.append)
    try:
        assert sync.wait_connected(10)
        wait_for(lambda: sync.stats.subscribed == 2, 10, "receipt and cmd subscriptions")
        wait_for(lambda: any(s.online for s in hub.states), 10, "the online state")

        gate.cut()
        wait_for(lambda: hub.states and not hub.states[-1].online, 10,
                 "the broker to publish the device's will")
        wait_for(lambda: gate.refused >= 1, 10, "the device to try to reconnect (refused)")
        assert not sync.connected and sync.stats.connects == 1
        queued = signed_command(signer, "while-away", seq=1)
        hub.send(queued)
        assert received == []

        gate.reopen()
        wait_for(lambda: sync.stats.connects == 2 and sync.stats.subscribed == 4, 15,
                 "the reconnect and its subscriptions")
        after = signed_command(signer, "after-reconnect", seq=2)
        hub.send(after)
        wait_for(lambda: any(c.command_id == "after-reconnect" for c in received), 10,
                 "the command sent after the reconnect")
        # the reconnect found its session, and says so where an operator looks
        assert sync.stats.sessions_resumed == 1
        assert sync.status()["connects"] == 2 and sync.status()["sessions_resumed"] == 1
    finally:
        sync.stop()
        gate.close()
    # MQTT keeps a publisher's order on a topic: the queued command comes first
    assert [c.command_id for c in received] == ["while-away", "after-reconnect"], (
        "the command sent while the device was away was lost: no persistent session")
    assert received[0] == queued
    check_verified(received[0], signer)
    assert session_flags(caplog) == ["False", "True"]
    assert broker_connects(mosquitto) == [f"{BROKER_PROTOCOL[version]}, c0"] * 2


@pytest.mark.parametrize("version", [5, 311])
def test_command_sent_while_agent_is_stopped_arrives_after_restart(
        version: int, mosquitto: Any, hub: Hub, store: AgentStore, signer: Ed25519PrivateKey,
        caplog: pytest.LogCaptureFixture) -> None:
    """A clean stop (offline state, DISCONNECT) keeps the session too: a command sent while
    no agent runs reaches a new Sync with the same client id, which finds its session."""
    caplog.set_level(logging.INFO, logger="edge_agent.sync")
    s = settings(mosquitto.port, mqtt_version=version)
    first: list[Command] = []
    sync: Sync = start_sync(store, s, on_command=first.append)
    try:
        assert sync.wait_connected(10)
        wait_for(lambda: sync.stats.subscribed == 2, 10, "receipt and cmd subscriptions")
    finally:
        sync.stop()
    wait_for(lambda: broker_saw_disconnect(mosquitto), 10, "the broker to log the DISCONNECT")
    queued = signed_command(signer, "while-stopped", seq=1)
    hub.send(queued)

    received: list[Command] = []
    sync = start_sync(store, s, on_command=received.append)
    try:
        assert sync.wait_connected(10)
        wait_for(lambda: sync.stats.subscribed == 2, 10, "the new Sync's subscriptions")
        after = signed_command(signer, "after-restart", seq=2)
        hub.send(after)
        wait_for(lambda: any(c.command_id == "after-restart" for c in received), 10,
                 "the command sent after the restart")
        assert sync.stats.connects == 1 and sync.stats.sessions_resumed == 1
    finally:
        sync.stop()
    assert first == []
    assert [c.command_id for c in received] == ["while-stopped", "after-restart"], (
        "the command sent while the agent was stopped was lost: no persistent session")
    assert received[0] == queued
    check_verified(received[0], signer)
    assert session_flags(caplog) == ["False", "True"]
    assert broker_connects(mosquitto) == [f"{BROKER_PROTOCOL[version]}, c0"] * 2

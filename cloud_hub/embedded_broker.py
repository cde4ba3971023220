"""The quick-start MQTT broker: amqtt on loopback, in a background thread of the hub process.

``edgefleet hub serve`` starts one when no broker URL is configured, so a laptop needs nothing
else to try the loop. Production and the tests use Mosquitto (devices/mosquitto/); this broker
is for one machine and a handful of devices::

    with EmbeddedBroker() as broker:      # 127.0.0.1, a free port
        worker = HubWorker(store, broker_url=broker.url, mqtt_version=311, shared=False)

What amqtt 0.12 is (read from its source and seen in tests/cloud_hub/test_worker.py; each
point shapes how the hub talks to it):

- MQTT 3.1.1 only. A bare MQTT 5 CONNECT is answered "unsupported protocol version", but one
  carrying MQTT 5 properties (session expiry, receive maximum) gets no answer at all, so
  ``HubWorker(mqtt_version="auto")`` asks with a bare one first.
- No shared subscriptions: ``$share/<group>/...`` is a literal filter that matches nothing, so
  the hub subscribes to the plain filters and runs one worker.
- A session that authenticated as *anonymous* is never persistent (no offline queue, removed at
  disconnect), whatever its clean-session flag. :class:`LoopbackAuthPlugin` accepts every
  client without marking it anonymous, so ``clean_session=False`` sessions keep their
  subscriptions and QoS 1 queue while the client is away (in memory: this broker dies with the
  hub process, and the devices resend what was never receipted).
- An outgoing QoS 1 message waits 5 s for its PUBACK and is then dropped, and unacknowledged
  messages are dropped when the subscriber disconnects (not redelivered). The hub's ack-after-
  commit therefore guarantees nothing here; the device's resend of unreceipted batches does.
  Messages queued for an offline session arrive with the retain flag set.
- No message size limit and no ACL by default: loopback only, never on a public interface.
- A TCP connection closed before its CONNECT leaves a socket unclosed inside amqtt (a
  ResourceWarning), so :meth:`EmbeddedBroker.start` does not probe the port: amqtt's start
  returns once its listening socket is bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from cloud_hub.mosquitto import BrokerError, free_port

__all__ = ["EmbeddedBroker", "LoopbackAuthPlugin"]

log = logging.getLogger(__name__)

#: seconds a disconnected persistent session (and its queue) is kept
DEFAULT_SESSION_EXPIRY = 24 * 3600


with warnings.catch_warnings():
    # amqtt's authentication module imports the stdlib `crypt` module (deprecated since 3.11)
    # and filters that warning itself today; this keeps a future amqtt from failing the hub
    warnings.filterwarnings("ignore", message=r".*'crypt' is deprecated.*",
                            category=DeprecationWarning)
    from amqtt.broker import Broker as _AmqttBroker  # type: ignore[import-untyped]
    from amqtt.plugins.base import BaseAuthPlugin  # type: ignore[import-untyped]


class LoopbackAuthPlugin(BaseAuthPlugin):
    """Accept every client, without marking its session anonymous (so it can be persistent)."""

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Any) -> bool:
        return True


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (loopback, a free port by default) in its own thread.

    ``start()`` returns once it accepts connections; ``stop()`` shuts it down and joins the
    thread. Raises :class:`~cloud_hub.mosquitto.BrokerError` when it cannot start.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 session_expiry: int = DEFAULT_SESSION_EXPIRY) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.session_expiry = session_expiry
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                      "max_connections": 1000}},
            "session_expiry_interval": self.session_expiry,
            "plugins": {f"{__name__}.LoopbackAuthPlugin": {}},
        }

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self.running:
            return self
        self._started.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise BrokerError(f"the embedded broker did not start within {timeout} s on "
                              f"{self.host}:{self.port}")
        if self._error is not None:
            error = self._error
            self._thread.join(timeout)
            self._thread = None
            raise BrokerError(f"the embedded broker cannot listen on {self.host}:{self.port}: "
                              f"{error}") from error
        log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) listening on %s", self.url)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._broker = _AmqttBroker(self._config(), loop=loop)
            loop.run_until_complete(self._broker.start())
        except BaseException as err:  # reported to start(), which raises BrokerError
            self._error = err
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (its sessions and queues go with it) and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive() and self._broker is not None and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                future.result(timeout)
            except Exception as err:  # a broker that fails to shut down still gets stopped
                log.warning("embedded broker shutdown: %s", err)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

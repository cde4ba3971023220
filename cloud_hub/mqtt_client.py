"""The hub worker's MQTT client: MQTT 5 or 3.1.1 on one socket, read in large chunks.

Why not paho here (paho stays the devices' client, edge_agent.sync): paho reads each packet
with three or more ``recv`` calls, decodes every MQTT 5 property in Python, and writes each
PUBACK with a ``send`` of its own plus a wake-up byte. Measured with ``edgefleet bench hub``
(one window per message, ~1,750 B): a paho subscriber that only counts costs ~54 µs of CPU per
message, half of what the whole hub may spend to keep up with the broker. This client reads up
to 256 KiB per ``recv``, parses every complete packet in it, and writes a committed batch's
PUBACKs and receipts with one ``sendall``.

What it does, and only that (the hub's needs; ``cloud_hub.worker`` says why each one):

- CONNECT with a client id, username/password, keepalive, TLS; MQTT 5 with clean start off, a
  session expiry, a Receive Maximum and a Maximum Packet Size, or 3.1.1 with clean session
  off; the broker's Server Keep Alive replaces ours when it sends one (MQTT 5 §3.2.2.3.14),
  and a Receive Maximum of 0 in its CONNACK is a protocol error (§3.2.2.3.3).
  :meth:`HubMqttClient.probe` asks with a bare MQTT 5 CONNECT whether the broker speaks MQTT 5
  (amqtt answers a CONNECT carrying properties with nothing at all, and a bare one with
  "unsupported protocol version").
- SUBSCRIBE and UNSUBSCRIBE (QoS 1), their SUBACK and UNSUBACK.
- Incoming PUBLISH at QoS 0 and 1, handed over as ``(packet id, qos, topic, payload)`` and
  acknowledged only when the caller says so (:meth:`HubMqttClient.ack`). QoS 2 is a protocol
  error: the hub subscribes at QoS 1, so no broker sends one. No topic aliases (we announce a
  Topic Alias Maximum of 0, the default).
- Nothing larger than ``max_packet_size`` is buffered, whatever the broker declares: an MQTT 5
  broker is told the limit and drops such a message itself (§3.1.2.11.4); one that sends it
  anyway, and any 3.1.1 broker (which cannot be told), has its PUBLISH skipped: its bytes are
  discarded as they arrive, and it is acknowledged once skipped (it can never be delivered,
  and unacknowledged it would hold a slot of the in-flight window forever) and reported as an
  ``("oversized", ...)`` event. Any other packet over the limit, a CONNACK included, is a
  protocol error.
- Outgoing PUBLISH at QoS 1 (receipts): at most ``max_inflight`` unacknowledged (the broker's
  Receive Maximum if lower), the rest queued; all of them kept until their PUBACK, across
  connections, and sent again (DUP) after the next CONNACK. A PUBACK with a failure reason
  (MQTT 5, >= 0x80: the broker's ACL refused it, say) ends the message too, and is reported as
  a ``("refused", ...)`` event.
- PINGREQ when nothing was sent for a keepalive; the connection is declared lost when the
  PINGRESP does not come within another keepalive of reading (while the caller does not read,
  the answer may be waiting unread: see :meth:`HubMqttClient.tick`).
- DISCONNECT, MQTT 5 with a session expiry of 0 when the session should end.

Not thread-safe: one thread (the worker's network thread) owns a client. Errors of the socket,
TLS and the protocol become :class:`~cloud_hub.errors.MqttConnectionError`, here and only here.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cloud_hub.errors import MqttConnectionError

__all__ = ["DEFAULT_MAX_PACKET_SIZE", "MQTT_MAX_PACKET_SIZE", "ConnAck", "HubMqttClient",
           "Received", "tls_context"]

_READ_BYTES = 256 * 1024
#: the largest packet MQTT can express: remaining length 268,435,455 and its 5 header bytes
MQTT_MAX_PACKET_SIZE = 268_435_460
#: the largest packet a client takes unless told otherwise (the hub worker passes its own
#: limit, cloud_hub.worker.MAX_PACKET_SIZE)
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
#: CONNACK codes that mean "not MQTT 5 here": 3.1.1's "unacceptable protocol version" (what a
#: 3.1.1 broker answers) and MQTT 5's "unsupported protocol version"
_NOT_V5 = (0x01, 0x84)
_CONNACK_NAMES = {
    0x01: "unacceptable protocol version", 0x02: "identifier rejected",
    0x03: "server unavailable", 0x04: "bad user name or password", 0x05: "not authorized",
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
    0x89: "server busy", 0x8A: "banned", 0x8C: "bad authentication method",
    0x8E: "session taken over", 0x95: "packet too large", 0x97: "quota exceeded",
    0x9F: "connection rate exceeded",
}
#: MQTT 5 PUBACK failure reasons (§3.4.2.1)
_PUBACK_NAMES = {
    0x80: "unspecified error", 0x83: "implementation specific error", 0x87: "not authorized",
    0x90: "topic name invalid", 0x91: "packet identifier in use", 0x97: "quota exceeded",
    0x99: "payload format invalid",
}
# MQTT 5 property identifiers by value type (MQTT 5 §2.2.2.2)
_PROP_BYTE = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_PROP_INT2 = frozenset({0x13, 0x21, 0x22, 0x23})
_PROP_INT4 = frozenset({0x02, 0x11, 0x18, 0x27})
_PROP_VARINT = frozenset({0x0B})
_PROP_STRING = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_PROP_BINARY = frozenset({0x09, 0x16})
_PROP_PAIR = frozenset({0x26})
_PINGREQ = b"\xc0\x00"
_PUBACK_HEAD = 0x4002  # PUBACK, remaining length 2 (MQTT 5: reason "success" omitted)


def tls_context(ca_certs: str | None, certfile: str | None,
                keyfile: str | None) -> ssl.SSLContext:
    """The TLS context of a worker: the broker's certificate checked against ``ca_certs`` (or
    the system's CAs) and its host name; a client certificate when given. ValueError naming
    the file that cannot be loaded."""
    try:
        ctx = ssl.create_default_context(cafile=ca_certs)
        if certfile is not None:
            ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"TLS files (ca_certs={ca_certs}, certfile={certfile}, keyfile="
                         f"{keyfile}) cannot be loaded: {err}") from None
    return ctx


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(4):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise MqttConnectionError("malformed variable byte integer from the broker")


def _properties(data: bytes, pos: int) -> tuple[dict[int, Any], int]:
    """MQTT 5 properties at ``pos`` (length first) -> ({id: value}, position after them)."""
    length, pos = _read_varint(data, pos)
    end = pos + length
    out: dict[int, Any] = {}
    while pos < end:
        pid, pos = _read_varint(data, pos)
        if pid in _PROP_BYTE:
            value: Any = data[pos]
            pos += 1
        elif pid in _PROP_INT2:
            value = int.from_bytes(data[pos:pos + 2], "big")
            pos += 2
        elif pid in _PROP_INT4:
            value = int.from_bytes(data[pos:pos + 4], "big")
            pos += 4
        elif pid in _PROP_VARINT:
            value, pos = _read_varint(data, pos)
        elif pid in _PROP_STRING or pid in _PROP_BINARY:
            n = int.from_bytes(data[pos:pos + 2], "big")
            value = bytes(data[pos + 2:pos + 2 + n])
            pos += 2 + n
        elif pid in _PROP_PAIR:
            for _ in range(2):
                n = int.from_bytes(data[pos:pos + 2], "big")
                pos += 2 + n
            continue
        else:
            raise MqttConnectionError(f"unknown MQTT 5 property 0x{pid:02X} from the broker")
        out[pid] = value
    if pos != end:
        raise MqttConnectionError("malformed MQTT 5 properties from the broker")
    return out, end


@dataclass(frozen=True)
class ConnAck:
    """The broker's answer to CONNECT."""

    reason: int
    session_present: bool
    properties: dict[int, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason == 0

    @property
    def reason_name(self) -> str:
        return _CONNACK_NAMES.get(self.reason, f"reason code {self.reason}")

    @property
    def not_v5(self) -> bool:
        """The broker does not speak MQTT 5."""
        return self.reason in _NOT_V5


#: one incoming PUBLISH: (packet id (0 at QoS 0), qos, topic, payload)
Received = tuple[int, int, str, bytes]


class HubMqttClient:
    """See the module docstring. ``connect`` opens a connection (again after a loss); the
    queue of outgoing QoS 1 messages lives across connections."""

    def __init__(self, host: str, port: int, *, client_id: str, v5: bool, keepalive: int,
                 username: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None, session_expiry: int = 0,
                 receive_maximum: int = 65535, max_inflight: int = 100,
                 max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                 connect_timeout: float = 10.0) -> None:
        if not 64 <= max_packet_size <= MQTT_MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size {max_packet_size} is not between 64 and "
                             f"{MQTT_MAX_PACKET_SIZE} bytes")
        self.host, self.port = host, port
        self.client_id = client_id
        self.v5 = v5
        self.keepalive = keepalive
        self.username, self.password = username, password
        self.tls = tls
        self.session_expiry, self.receive_maximum = session_expiry, receive_maximum
        self.max_inflight = max_inflight
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 0
        #: outgoing QoS 1: sent and not acknowledged (packet id -> packet), and waiting
        self._inflight: dict[int, bytes] = {}
        self._waiting: deque[tuple[str, bytes]] = deque()
        self._inflight_cap = max_inflight
        self._out: list[bytes] = []
        self._ids_in_use: set[int] = set()  # SUBSCRIBE / UNSUBSCRIBE waiting for their answer
        #: when the wait for a PINGRESP started: the PINGREQ went out, or the caller last
        #: did not read the socket (see tick); None when no PINGREQ is unanswered
        self._pong_wait_from: float | None = None
        self._last_sent = 0.0
        self._keepalive_now = keepalive
        self._unparsed = False  # bytes that came with the CONNACK, not parsed yet
        #: an oversized PUBLISH being skipped: its bytes still to discard, and (packet id,
        #: qos, topic, packet size) to acknowledge and report once they are
        self._skip = 0
        self._skipping: tuple[int, int, str, int] | None = None

    # --- connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _open(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except (OSError, ssl.SSLError) as err:
            raise MqttConnectionError(f"cannot connect to {self.host}:{self.port}: "
                                      f"{err}") from err
        return sock

    def _connect_packet(self, *, v5: bool, clean: bool, properties: bool) -> bytes:
        flags = 0x02 if clean else 0
        payload = _string(self.client_id)
        if self.username is not None:
            flags |= 0x80
            payload += _string(self.username)
            if self.password is not None:
                flags |= 0x40
                payload += _string(self.password.encode("utf-8"))
        body = _string("MQTT") + bytes((5 if v5 else 4, flags)) + struct.pack(">H",
                                                                             self.keepalive)
        if v5:
            props = b""
            if properties:
                props = (b"\x11" + struct.pack(">I", self.session_expiry)
                         + b"\x21" + struct.pack(">H", self.receive_maximum)
                         + b"\x27" + struct.pack(">I", self.max_packet_size))
            body += _varint(len(props)) + props
        return _packet(0x10, body + payload)

    def _handshake(self, packet: bytes, v5: bool) -> tuple[socket.socket, ConnAck]:
        sock = self._open()
        try:
            sock.settimeout(self.connect_timeout)
            sock.sendall(packet)
            buf = bytearray()
            while True:
                if buf and buf[0] != 0x20:
                    raise MqttConnectionError(f"broker {self.host}:{self.port} answered "
                                              f"CONNECT with packet type 0x{buf[0]:02X}")
                if len(buf) >= 2:
                    length, start = _read_varint(buf + b"\x00\x00\x00", 1)
                    if start + length > self.max_packet_size:  # never buffered
                        raise MqttConnectionError(
                            f"broker {self.host}:{self.port} answered CONNECT with a CONNACK "
                            f"of {start + length} bytes, larger than the maximum packet size "
                            f"of {self.max_packet_size} bytes (a CONNACK is a few bytes: is "
                            "it an MQTT broker?)")
                    if len(buf) >= start + length:
                        break
                data = sock.recv(_READ_BYTES)
                if not data:
                    raise MqttConnectionError(f"broker {self.host}:{self.port} closed the "
                                              "connection before its CONNACK")
                buf += data
            if length < 2:
                raise MqttConnectionError(f"broker {self.host}:{self.port} answered CONNECT "
                                          f"with a CONNACK of {length} bytes (2 or more "
                                          "expected)")
            body = bytes(buf[start:start + length])
            props: dict[int, Any] = {}
            if v5 and length > 2 and body[1] not in _NOT_V5:
                props, _ = _properties(body, 2)
            ack = ConnAck(body[1], bool(body[0] & 1), props)
            self._buf = bytearray(buf[start + length:])
        except (OSError, ssl.SSLError, IndexError) as err:
            sock.close()
            raise MqttConnectionError(f"no CONNACK from {self.host}:{self.port}: "
                                      f"{err or type(err).__name__}") from err
        except MqttConnectionError:
            sock.close()
            raise
        return sock, ack

    def probe(self) -> ConnAck:
        """A throwaway MQTT 5 CONNECT (clean start, no properties) and its CONNACK; then the
        connection is closed. ``not_v5`` on the answer: use MQTT 3.1.1."""
        sock, ack = self._handshake(self._connect_packet(v5=True, clean=True,
                                                         properties=False), True)
        try:
            if ack.ok:
                sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        finally:
            sock.close()
        return ack

    def connect(self) -> ConnAck:
        """Open the connection and send CONNECT; the CONNACK. When it accepts, the QoS 1
        messages not acknowledged on the last connection are sent again (DUP) with the queued
        ones. MqttConnectionError when the broker cannot be reached or does not answer."""
        self.close()
        sock, ack = self._handshake(self._connect_packet(
            v5=self.v5, clean=False, properties=self.v5), self.v5)
        if not ack.ok:
            sock.close()
            return ack
        receive_maximum = ack.properties.get(0x21, 65535)
        if receive_maximum == 0:  # MQTT 5 §3.2.2.3.3; as a cap it would stop every receipt
            sock.close()
            raise MqttConnectionError(f"broker {self.host}:{self.port} sent a Receive Maximum "
                                      "of 0 in its CONNACK, which MQTT 5 forbids (a protocol "
                                      "error; 1 to 65535 expected)")
        sock.settimeout(max(5.0, float(self.keepalive)))
        self._sock = sock
        self._unparsed = bool(self._buf)
        self._ids_in_use.clear()
        self._pong_wait_from = None
        self._last_sent = time.monotonic()
        self._keepalive_now = ack.properties.get(0x13, self.keepalive)
        self._inflight_cap = min(self.max_inflight, receive_maximum)
        # in the order first sent (all of them, even past a lower Receive Maximum of this
        # broker: they were in flight already)
        self._out = [_dup(p) for p in self._inflight.values()]
        self._fill_inflight()
        return ack

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._out = []
        self._skip, self._skipping = 0, None  # a new connection starts at a packet boundary
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def disconnect(self, *, end_session: bool = False) -> None:
        """Send what is queued, then DISCONNECT (MQTT 5 with a session expiry of 0 when
        ``end_session``: the broker keeps nothing for this client id), and close."""
        if self._sock is None:
            return
        if self.v5 and end_session:
            self._out.append(b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00")
        else:
            self._out.append(b"\xe0\x00")
        with contextlib.suppress(MqttConnectionError):
            self.flush()
        self.close()

    # --- reading ------------------------------------------------------------------------

    def wait(self, timeout: float, also: socket.socket | None = None) -> tuple[bool, bool]:
        """Wait at most ``timeout`` s until the broker's socket or ``also`` is readable:
        (socket readable, ``also`` readable). Call :meth:`read` only when the first is true."""
        sock = self._sock
        if sock is None:
            raise MqttConnectionError("not connected")
        if self._unparsed or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return True, False  # bytes select cannot see: read() parses them
        watch: list[Any] = [sock] if also is None else [sock, also]
        try:
            readable, _, _ = select.select(watch, [], [], max(0.0, timeout))
        except (OSError, ValueError) as err:
            raise MqttConnectionError(f"connection to {self.host}:{self.port} lost: "
                                      f"{err}") from err
        return sock in readable, also is not None and also in readable

    def read(self) -> tuple[list[Received], list[tuple[Any, ...]]]:
        """One ``recv`` of up to 256 KiB (call it when :meth:`wait` says the socket is
        readable), then every complete packet parsed: (incoming PUBLISHes, control events).
        Events: ``("suback", id, [reason codes])``, ``("unsuback", id)``, ``("disconnect",
        reason code, reason text)``, ``("oversized", topic, qos, packet size)`` (a PUBLISH over
        ``max_packet_size``, skipped and already acknowledged), ``("refused", topic, reason
        code, reason text)`` (a PUBACK with a failure reason for one of our messages). The
        broker's PUBACKs and PINGRESPs are handled here."""
        sock = self._sock
        if sock is None:
            raise MqttConnectionError("not connected")
        if self._unparsed:  # what came with the CONNACK first, without waiting for more
            self._unparsed = False
            return self._parse_or_fail()
        try:
            data = sock.recv(_READ_BYTES)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            data = None
        except (OSError, ssl.SSLError) as err:
            raise MqttConnectionError(f"connection to {self.host}:{self.port} lost: "
                                      f"{err}") from err
        if data is not None:
            if not data:
                raise MqttConnectionError(f"broker {self.host}:{self.port} closed the "
                                          "connection")
            self._buf += data
        return self._parse_or_fail()

    def _parse_or_fail(self) -> tuple[list[Received], list[tuple[Any, ...]]]:
        try:
            return self._parse()
        except (IndexError, ValueError) as err:
            raise MqttConnectionError(f"malformed packet from {self.host}:{self.port}: "
                                      f"{err}") from err

    def _parse(self) -> tuple[list[Received], list[tuple[Any, ...]]]:
        buf = self._buf
        received: list[Received] = []
        events: list[tuple[Any, ...]] = []
        if self._skip:  # the rest of an oversized PUBLISH: discarded as it arrives
            drop = min(self._skip, len(buf))
            del buf[:drop]
            self._skip -= drop
            if self._skip:
                return received, events
            self._end_skip(events)
        n = len(buf)
        pos = 0
        v5 = self.v5
        view = memoryview(buf)  # slices of it copy once (a bytearray slice copies twice)
        try:
            pos = self._parse_into(buf, view, n, received, events, v5)
        finally:
            view.release()  # before the buffer is resized
        if pos:
            del buf[:pos]
        return received, events

    def _parse_into(self, buf: bytearray, view: memoryview, n: int, received: list[Received],
                    events: list[tuple[Any, ...]], v5: bool) -> int:
        """Parse the complete packets of ``buf`` into ``received`` and ``events``; the
        position after the last one (``n`` when an oversized PUBLISH is being skipped)."""
        pos = 0
        limit = self.max_packet_size
        while n - pos >= 2:
            first = buf[pos]
            i = pos + 1
            length = buf[i] & 0x7F
            if buf[i] & 0x80:  # a longer remaining length (most PUBLISHes: >127 bytes)
                shift = 7
                while True:
                    i += 1
                    if i >= n:
                        break
                    length |= (buf[i] & 0x7F) << shift
                    if buf[i] < 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttConnectionError("malformed remaining length from the broker")
                if i >= n:
                    break
            start = i + 1
            end = start + length
            if end - pos > limit:  # never buffered: see the module docstring
                if first >> 4 != 3:
                    raise MqttConnectionError(
                        f"the broker sent a packet of type {first >> 4} of {end - pos} bytes, "
                        f"larger than the maximum packet size of {limit} bytes")
                after = self._begin_skip(buf, view, pos, start, end, n, events)
                if after is None:
                    break  # its topic and packet id are not all here yet
                pos = after
                continue
            if end > n:
                break
            kind = first >> 4
            if kind == 3:  # PUBLISH
                j = start + 2 + ((buf[start] << 8) | buf[start + 1])
                try:
                    topic = str(view[start + 2:j], "utf-8")
                except UnicodeDecodeError:
                    raise MqttConnectionError("a PUBLISH topic from the broker is not UTF-8") \
                        from None
                qos = (first >> 1) & 3
                mid = 0
                if qos:
                    if qos > 1:
                        raise MqttConnectionError("the broker sent a QoS 2 message to a QoS 1 "
                                                  "subscription")
                    mid = (buf[j] << 8) | buf[j + 1]
                    j += 2
                if v5:
                    plen = buf[j]
                    if plen < 0x80:
                        j += 1 + plen
                    else:
                        plen, j = _read_varint(buf, j)
                        j += plen
                if not topic or j > end:
                    raise MqttConnectionError("malformed PUBLISH from the broker (empty topic "
                                              "or lengths past the packet)")
                received.append((mid, qos, topic, bytes(view[j:end])))
            else:
                self._control(kind, bytes(view[start:end]), events)
            pos = end
        return pos

    def _begin_skip(self, buf: bytearray, view: memoryview, pos: int, start: int, end: int,
                    n: int, events: list[tuple[Any, ...]]) -> int | None:
        """An oversized PUBLISH at ``pos`` (its body from ``start`` to ``end``, past ``n``
        mostly): None until its topic and packet id are in ``buf`` (at most 65,541 bytes of
        it); then where parsing goes on: ``end`` when all of it is here already, else ``n``,
        and the rest is discarded as it arrives (:meth:`_parse`)."""
        first = buf[pos]
        qos = (first >> 1) & 3
        if qos > 1:
            raise MqttConnectionError("the broker sent a QoS 2 message to a QoS 1 subscription")
        if n - start < 2:
            return None
        j = start + 2 + ((buf[start] << 8) | buf[start + 1])
        if j + 2 * qos > min(n, end):
            if j + 2 * qos > end:
                raise MqttConnectionError("malformed PUBLISH from the broker (topic past the "
                                          "packet)")
            return None
        topic = str(view[start + 2:j], "utf-8", "replace")  # for the log only
        mid = (buf[j] << 8) | buf[j + 1] if qos else 0
        self._skipping = (mid, qos, topic, end - pos)
        if end <= n:
            self._end_skip(events)
            return end
        self._skip = end - n
        return n

    def _end_skip(self, events: list[tuple[Any, ...]]) -> None:
        """The last byte of an oversized PUBLISH is discarded: acknowledge it (QoS 1; ahead
        of the caller's acks of earlier messages, which brokers take in any order) and report
        it."""
        skipped, self._skipping = self._skipping, None
        if skipped is None:
            return
        mid, qos, topic, size = skipped
        if qos:
            self._out.append(struct.pack(">HH", _PUBACK_HEAD, mid))
        events.append(("oversized", topic, qos, size))

    def _control(self, kind: int, body: bytes, events: list[tuple[Any, ...]]) -> None:
        if kind == 4:  # PUBACK of one of our receipts (any reason: it is done with)
            packet = self._inflight.pop(int.from_bytes(body[:2], "big"), None)
            if self.v5 and len(body) > 2 and body[2] >= 0x80 and packet is not None:
                props = _properties(body, 3)[0] if len(body) > 3 else {}
                text = props.get(0x1F, b"").decode("utf-8", "replace")
                events.append(("refused", _publish_topic(packet), body[2],
                               text or _PUBACK_NAMES.get(body[2], "")))
            self._fill_inflight()
        elif kind == 13:  # PINGRESP
            self._pong_wait_from = None
        elif kind == 9:  # SUBACK
            mid = int.from_bytes(body[:2], "big")
            pos = _properties(body, 2)[1] if self.v5 else 2
            self._ids_in_use.discard(mid)
            events.append(("suback", mid, list(body[pos:])))
        elif kind == 11:  # UNSUBACK
            mid = int.from_bytes(body[:2], "big")
            self._ids_in_use.discard(mid)
            events.append(("unsuback", mid))
        elif kind == 14:  # DISCONNECT (MQTT 5: the broker says why)
            reason = body[0] if body else 0
            props = _properties(body, 1)[0] if self.v5 and len(body) > 1 else {}
            text = props.get(0x1F, b"").decode("utf-8", "replace")
            events.append(("disconnect", reason, text or _CONNACK_NAMES.get(reason, "")))
        else:
            raise MqttConnectionError(f"unexpected MQTT packet type {kind} from the broker")

    # --- writing ------------------------------------------------------------------------

    def _packet_id(self) -> int:
        """A packet id not in use by an unacknowledged message or a pending (UN)SUBSCRIBE."""
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._ids_in_use:
                return self._next_id
        raise MqttConnectionError("no free MQTT packet id (65,535 in use)")

    def subscribe(self, filters: list[str]) -> int:
        """Queue a SUBSCRIBE of ``filters`` at QoS 1; its packet id (see the "suback" event)."""
        mid = self._packet_id()
        self._ids_in_use.add(mid)
        body = struct.pack(">H", mid) + (b"\x00" if self.v5 else b"")
        body += b"".join(_string(f) + b"\x01" for f in filters)
        self._out.append(_packet(0x82, body))
        return mid

    def unsubscribe(self, filters: list[str]) -> int:
        mid = self._packet_id()
        self._ids_in_use.add(mid)
        body = struct.pack(">H", mid) + (b"\x00" if self.v5 else b"")
        body += b"".join(_string(f) for f in filters)
        self._out.append(_packet(0xA2, body))
        return mid

    def ack(self, mids: list[int]) -> None:
        """Queue PUBACKs of QoS 1 messages received on this connection."""
        if mids:
            self._out.append(struct.pack(f">{2 * len(mids)}H",
                                         *[v for m in mids for v in (_PUBACK_HEAD, m)]))

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 PUBLISH (kept until the broker acknowledges it, across connections)."""
        self._waiting.append((topic, payload))
        self._fill_inflight()

    def _fill_inflight(self) -> None:
        """Send waiting QoS 1 messages while connected and under the in-flight cap."""
        waiting = self._waiting
        while waiting and self._sock is not None and len(self._inflight) < self._inflight_cap:
            topic, payload = waiting.popleft()
            mid = self._packet_id()
            body = _string(topic) + struct.pack(">H", mid) + (b"\x00" if self.v5 else b"")
            packet = _packet(0x32, body + payload)
            self._inflight[mid] = packet
            self._out.append(packet)

    @property
    def unacknowledged(self) -> int:
        """Outgoing QoS 1 messages the broker has not acknowledged yet (sent or waiting)."""
        return len(self._inflight) + len(self._waiting)

    def flush(self) -> None:
        """Send everything queued with one ``sendall``."""
        if not self._out or self._sock is None:
            return
        data = b"".join(self._out)
        self._out = []
        try:
            self._sock.sendall(data)
        except (OSError, ssl.SSLError) as err:
            raise MqttConnectionError(f"connection to {self.host}:{self.port} lost while "
                                      f"sending: {err}") from err
        self._last_sent = time.monotonic()

    def tick(self, now: float, *, reading: bool = True) -> float:
        """Keepalive: a PINGREQ when nothing was sent for a keepalive, MqttConnectionError
        when the last one was not answered within a keepalive. The seconds until the next
        check is due.

        ``reading`` False: the caller is not reading the socket now (back-pressure), so the
        PINGRESP may be waiting unread behind the messages the broker sent first. Pings still
        go out (the broker drops a client that says nothing for 1.5 keepalives), and the wait
        for their answer starts again when the caller reads: a broker that is really gone
        shows when a send fails, or a keepalive after reading resumes."""
        keepalive = self._keepalive_now
        if not keepalive:
            return 1.0
        if self._pong_wait_from is not None:
            if not reading:
                self._pong_wait_from = now
            elif now - self._pong_wait_from >= keepalive:
                raise MqttConnectionError(f"broker {self.host}:{self.port} did not answer a "
                                          f"ping within {keepalive} s")
        if now - self._last_sent >= keepalive:
            self._out.append(_PINGREQ)
            if self._pong_wait_from is None:
                self._pong_wait_from = now
            self.flush()
        due = self._last_sent + keepalive - now
        if self._pong_wait_from is not None:
            due = min(due, self._pong_wait_from + keepalive - now)
        return max(0.01, due)


def _publish_topic(packet: bytes) -> str:
    """The topic of a PUBLISH packet we built."""
    _, pos = _read_varint(packet, 1)
    n = int.from_bytes(packet[pos:pos + 2], "big")
    return packet[pos + 2:pos + 2 + n].decode("utf-8", "replace")


def _dup(packet: bytes) -> bytes:
    """A PUBLISH sent again: the DUP flag set."""
    return bytes((packet[0] | 0x08,)) + packet[1:]

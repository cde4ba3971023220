"""The agent's own HTTP/1.1 server, at the byte level: raw sockets against a tiny ASGI app."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.http_server import HttpServer

LIMIT = 1000
#: set when a /slow request has reached the app (the server is busy with it)
slow_entered = threading.Event()


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Echo the method, path and body size; /slow waits on a thread first; the limit is 413."""
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and int(declared) > LIMIT:
        status, body = 413, b"declared too big"
    else:
        msg = await receive()
        data = msg["body"]
        if msg["more_body"] or len(data) > LIMIT:
            status, body = 413, b"chunked too big"
        else:
            if scope["path"] == "/slow":
                slow_entered.set()
                await asyncio.to_thread(threading.Event().wait, 0.05)
            status, body = 200, f"{scope['method']} {scope['path']} {len(data)}".encode()
    extra = [(b"connection", b"close")] if status == 413 else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), *extra]})
    await send({"type": "http.response.body", "body": body})


class Running:
    def __init__(self, keep_alive_timeout: float = 75.0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = HttpServer(app, max_body_bytes=LIMIT,
                                 keep_alive_timeout=keep_alive_timeout)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()

        async def main() -> None:
            await self.server.start(self.sock)
            self.started.set()
            await self.stop_event.wait()
            await self.server.shutdown(timeout=5)

        self.loop.run_until_complete(main())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)
        assert not self.thread.is_alive()

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return s


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
    yield r
    r.stop()


def read_responses(s: socket.socket, n: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Read exactly ``n`` responses (Content-Length framed) from the socket."""
    buf = b""
    out: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} responses; buffer {buf!r}")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        if lines[0].startswith(b"HTTP/1.1 100"):
            continue
        size = int(headers[b"content-length"])
        while len(buf) < size:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a body")
            buf += chunk
        out.append((lines[0], headers, buf[:size]))
        buf = buf[size:]
    return out


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_requests_answer_in_order_even_when_one_waits(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /c?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        got = read_responses(s, 3)
    assert [body for _, _, body in got] == [b"POST /a 3", b"GET /slow 0", b"GET /c 0"]
    assert all(line == b"HTTP/1.1 200 OK" for line, _, _ in got)
    assert all(b"connection" not in headers for _, headers, _ in got)  # kept alive


def test_keep_alive_serves_many_requests_on_one_connection(running: Running) -> None:
    with running.connect() as s:
        for i in range(50):
            body = b"x" * i
            s.sendall(b"POST /p HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert read_responses(s, 1)[0][2] == b"POST /p %d" % i


def test_chunked_body_and_percent_decoded_path(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"POST /v2/models/a%2Db/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert read_responses(s, 1)[0][2] == b"POST /v2/models/a-b/infer 5"


def test_declared_oversize_body_is_refused_unread_and_closed(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"POST /p HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 10)
        line, headers, body = read_responses(s, 1)[0]
        assert line.startswith(b"HTTP/1.1 413") and body == b"declared too big"
        assert headers[b"connection"] == b"close"
        assert closed_by_peer(s)


def test_chunked_oversize_body_is_cut_off_at_the_limit(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.sendall((b"%x\r\n" % 600) + b"y" * 600 + b"\r\n")
        s.sendall((b"%x\r\n" % 600) + b"y" * 600 + b"\r\n")  # never finished: no 0 chunk
        line, _headers, body = read_responses(s, 1)[0]
        assert line.startswith(b"HTTP/1.1 413") and body == b"chunked too big"
        assert closed_by_peer(s)


def test_expect_100_continue(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"POST /p HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"abcd")
        assert read_responses(s, 1)[0][2] == b"POST /p 4"


def test_malformed_request_is_400_and_closed(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        line, _headers, body = read_responses(s, 1)[0]
        assert line.startswith(b"HTTP/1.1 400") and b"malformed" in body
        assert closed_by_peer(s)
    with running.connect() as s:  # the server goes on
        s.sendall(b"GET /ok HTTP/1.1\r\n\r\n")
        assert read_responses(s, 1)[0][2] == b"GET /ok 0"


def test_upgrade_is_refused(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        line, _, body = read_responses(s, 1)[0]
        assert line.startswith(b"HTTP/1.1 400") and b"upgrade" in body


def test_http10_closes_unless_keep_alive(running: Running) -> None:
    with running.connect() as s:
        s.sendall(b"GET /a HTTP/1.0\r\n\r\n")
        _, headers, _ = read_responses(s, 1)[0]
        assert headers[b"connection"] == b"close" and closed_by_peer(s)
    with running.connect() as s:
        s.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        read_responses(s, 1)
        s.sendall(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_responses(s, 1)[0][2] == b"GET /b 0"


def test_idle_connections_time_out() -> None:
    r = Running(keep_alive_timeout=0.2)
    try:
        with r.connect() as s:
            s.settimeout(5)
            s.sendall(b"GET /a HTTP/1.1\r\n\r\n")
            read_responses(s, 1)
            assert closed_by_peer(s)  # blocks until the server closes the idle connection
    finally:
        r.stop()


def test_shutdown_finishes_the_answer_in_flight_then_closes() -> None:
    r = Running()
    s = r.connect()
    try:
        idle = r.connect()
        idle.sendall(b"GET /a HTTP/1.1\r\n\r\n")
        read_responses(idle, 1)  # accepted and idle
        slow_entered.clear()
        s.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
        assert slow_entered.wait(5)
        r.stop()  # returns once the server has shut down
        assert read_responses(s, 1)[0][2] == b"GET /slow 0"
        assert closed_by_peer(s) and closed_by_peer(idle)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", r.port), timeout=1).close()
    finally:
        s.close()
        idle.close()

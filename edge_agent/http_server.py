"""A small HTTP/1.1 server for the agent's local API: asyncio + httptools, no ASGI server.

Why not uvicorn: the local API answers tiny requests whose inference takes tens of
microseconds, so the server's own per-request work is a large share of the total. uvicorn's
HTTP protocol wraps each request in a task, an ASGI receive/send pair and several dict
messages; here a parsed request calls the application coroutine directly and, when it finishes
without waiting on anything (every inference, health and metadata request), the response is
written in the same callback — no task, no scheduling round. A handler that does wait (a swap
command staging a bundle in a thread) runs as a task, and later requests on that connection
queue behind it, in order (HTTP/1.1 pipelining).

It serves the same ASGI 3 callable (``edge_agent.http_api.create_app``), with the subset of
the spec that app uses: ``http`` scopes with ``method``, ``path``, ``raw_path``,
``query_string`` and lower-cased ``headers``; one ``http.request`` message with the whole body;
``http.response.start`` and ``http.response.body``. What it does at the edges:

- request bodies: the app refuses a declared Content-Length over its limit before a byte of the
  body is read; a chunked body is cut off one byte past the limit and handed to the app, which
  answers 413; either way the connection is closed after the answer;
- ``Expect: 100-continue`` gets its interim response; malformed requests get 400 and a close;
  upgrades (WebSocket, h2c) are refused with 400;
- keep-alive as the request asks (HTTP/1.0 closes unless it says keep-alive); idle connections
  close after ``keep_alive_timeout`` seconds;
- shutdown: stop accepting, let answers in flight finish, close every connection.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1"))
                 for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "more", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.method = ""
        self.keep_alive = True
        #: the body was cut off at the limit (more follows, never read)
        self.more = False


class _Responder:
    """Collects one response from the app's ``send`` calls (no awaiting needed)."""

    __slots__ = ("body", "head", "status")

    def __init__(self) -> None:
        self.status = 500
        self.head: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.head = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            self.body.append(message.get("body", b""))


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.request: _Request | None = None
        self.size = 0
        self.queue: collections.deque[_Request] = collections.deque()
        self.busy = False
        self.closing = False
        self.idle_timer: asyncio.TimerHandle | None = None

    # --- transport events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.server.connections.add(self)
        if self.server.stopping:  # accepted just before the listener closed
            transport.close()
            return
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.queue.clear()
        self.server.connection_closed()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("protocol upgrades (WebSocket, h2c) are not served here")
        except httptools.HttpParserError as err:
            self._fail(f"malformed HTTP request: {err}")

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = _Request()
        self.size = 0

    def on_url(self, url: bytes) -> None:
        assert self.request is not None
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.request is not None
        self.request.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self.request
        assert req is not None
        if self.parser.should_upgrade():
            self._fail("protocol upgrades (WebSocket, h2c) are not served here")
            return
        req.method = self.parser.get_method().decode("ascii", "replace")
        req.keep_alive = self.parser.should_keep_alive()
        limit = self.server.max_body_bytes
        for name, value in req.headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                # the app answers 413 from the header alone; the body is never read
                req.keep_alive = False
                self._enqueue(req)
                self.closing = True
                return
            if name == b"expect" and value.lower() == b"100-continue" and self.transport:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        req = self.request
        if req is None or req.more or self.closing:
            return
        self.size += len(body)
        req.body.append(body)
        if self.size > self.server.max_body_bytes:
            # a chunked body past the limit: hand over what came, answer 413, close
            req.more = True
            req.keep_alive = False
            self._enqueue(req)
            self.closing = True

    def on_message_complete(self) -> None:
        req = self.request
        self.request = None
        if req is None or self.closing:
            return
        self._enqueue(req)

    # --- dispatch -----------------------------------------------------------------------------

    def _enqueue(self, req: _Request) -> None:
        self.queue.append(req)
        if not self.busy:
            self._drain()

    def _drain(self) -> None:
        while self.queue and not self.busy:
            req = self.queue.popleft()
            responder = _Responder()
            coro = self._call_app(req, responder)
            try:
                first = coro.send(None)
            except StopIteration:
                self._respond(req, responder)
                continue
            except BaseException:  # the app handles its own errors; this is a bug
                log.exception("local API handler failed")
                responder.status, responder.head, responder.body = 500, [], []
                self._respond(req, responder)
                continue
            # the handler waits on something (a thread): finish it as a task, in order
            self.busy = True
            task = asyncio.ensure_future(_resume(coro, first))
            task.add_done_callback(functools.partial(self._finished, req=req,
                                                     responder=responder))

    def _finished(self, task: asyncio.Future[None], *, req: _Request,
                  responder: _Responder) -> None:
        self.busy = False
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("local API handler failed", exc_info=task.exception())
            responder.status, responder.head, responder.body = 500, [], []
        self._respond(req, responder)
        self._drain()
        self.server.request_done()

    def _call_app(self, req: _Request, responder: _Responder) -> Coroutine[Any, Any, None]:
        parsed = httptools.parse_url(req.url)
        raw_path = parsed.path or b"/"
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": req.method, "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path,
            "query_string": parsed.query or b"", "headers": req.headers,
            "server": self.server.address, "client": None,
        }
        body = b"".join(req.body) if len(req.body) != 1 else req.body[0]
        message = {"type": "http.request", "body": body, "more_body": req.more}
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return message

        return self.server.app(scope, receive, responder)  # type: ignore[return-value]

    def _respond(self, req: _Request, responder: _Responder) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        keep = req.keep_alive and not self.server.stopping and not (
            self.closing and not self.queue)
        parts = [_status_line(responder.status)]
        for name, value in responder.head:
            if name == b"connection" and value.lower() == b"close":
                keep = False
                continue
            parts.append(b"%s: %s\r\n" % (name, value))
        if not any(name == b"content-length" for name, _ in responder.head):
            parts.append(b"content-length: %d\r\n" % sum(len(b) for b in responder.body))
        if not keep:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.extend(responder.body)
        transport.write(b"".join(parts))
        if not keep:
            self.closing = True
            self.queue.clear()
            transport.close()
        elif not self.queue:
            self._arm_idle()

    def _fail(self, reason: str) -> None:
        if self.closing:
            return
        body = b'{"error": "%s"}' % reason.replace('"', "'").encode("utf-8", "replace")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_BAD_REQUEST % (len(body), body))
            self.transport.close()
        self.closing = True

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        loop = asyncio.get_running_loop()
        self.idle_timer = loop.call_later(self.server.keep_alive_timeout, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if not self.busy and not self.queue and self.transport is not None:
            self.transport.close()

    def close_when_idle(self) -> None:
        if not self.busy and not self.queue and self.transport is not None:
            self.transport.close()


class _Resume:
    """Awaitable finishing a coroutine that already ran up to its first suspension.

    ``first`` is what the coroutine yielded there (an asyncio future it waits on); a task
    awaiting this object waits on that future, then drives the coroutine on to the end.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Any:
        coro, yielded = self.coro, self.first
        while True:
            try:
                value = yield yielded
            except BaseException as err:  # cancellation: hand it to the coroutine
                try:
                    yielded = coro.throw(err)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _resume(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Resume(coro, first)


class HttpServer:
    """Serve an ASGI app on an already-bound listening socket, in the running event loop."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, keep_alive_timeout: float = 75.0
                 ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keep_alive_timeout = keep_alive_timeout
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.address: tuple[str, int] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._changed: asyncio.Event | None = None

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.address = sock.getsockname()[:2]
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock,
                                                backlog=2048)

    def connection_closed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def request_done(self) -> None:
        if self.stopping:
            for conn in list(self.connections):
                conn.close_when_idle()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight answers finish, close every connection."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for _ in range(3):  # let connections accepted just before the close come in (and go)
            await asyncio.sleep(0)
        for conn in list(self.connections):
            conn.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            assert self._changed is not None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - loop.time()))
            except TimeoutError:
                break
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

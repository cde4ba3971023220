"""The agent's local HTTP API: a raw ASGI app on edgefleet's own small server (httptools, uvloop).

Endpoints (every error body is ``{"error": "<what failed, the value, what was expected>"}``)::

    GET  /v2/health/live                         200
    GET  /v2/health/ready                        200 when a verified model serves, else 503
    GET  /v2                                     server metadata
    GET  /v2/models/{name}[/versions/{v}]        model metadata (404 unless it is blue)
    GET  /v2/models/{name}[/versions/{v}]/ready  200 / 404
    POST /v2/models/{name}[/versions/{v}]/infer  Open Inference Protocol v2 (see edge_agent.oip)
    POST /v1/predict                             {"inputs": {feature: value} | [rows] | [samples]}
    POST /feedback                               {"prediction_id": ..., "label": ...}
    GET  /v1/status                              Agent.status()
    GET  /v1/swap                                the blue-green swap state
    POST /v1/swap                                {"command": "stage", "id": ..., "source": ...}
                                                 (or shadow, promote, commit, rollback; 409 when
                                                 the swap machine refuses; 503 when the agent
                                                 shuts down during it: resumed at next start)

No web framework: routing is a dict lookup and a split, bodies are read with their size checked
against ``http.max_body_bytes`` before anything is parsed (413), JSON is orjson, and inference
runs inline in the event loop (a single row through onnxruntime takes tens of microseconds; a
thread-pool hop would cost more than it saves). Feedback and status touch SQLite inline too:
they are rare and short, and the agent serialises its own writes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import orjson

from edge_agent.agent import Agent, LoadedModel, PredictResult
from edge_agent.errors import (
    AgentError,
    ConfigError,
    FeedbackError,
    InputError,
    NotReadyError,
)
from edge_agent.http_server import HttpServer
from edge_agent.oip import ModelSignature, decode_infer_request, encode_infer_response
from edge_agent.swap_commands import parse_command
from edge_agent.swap_runner import SwapInterrupted

__all__ = ["ASGIApp", "RunningServer", "create_app", "serve_forever", "serve_in_thread"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Response = tuple[int, bytes, list[tuple[bytes, bytes]]]

try:
    VERSION = metadata.version("edgefleet")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0+unknown"

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_FIXED = {  # path -> (what, method)
    "/v2/health/live": ("live", "GET"), "/v2/health/ready": ("health", "GET"),
    "/v2": ("server", "GET"), "/v1/predict": ("predict", "POST"),
    "/feedback": ("feedback", "POST"), "/v1/status": ("status", "GET"),
    "/v1/swap": ("swap", "GET|POST"),
}
_MODEL_PREFIX = "/v2/models/"


def _json(status: int, doc: Any) -> Response:
    body = orjson.dumps(doc, option=_NUMPY, default=str)
    return status, body, [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]


def _error(status: int, message: str, *extra: tuple[bytes, bytes]) -> Response:
    status, body, headers = _json(status, {"error": message})
    headers.extend(extra)
    return status, body, headers


def _model_route(path: str) -> tuple[str, str, str | None] | None:
    """/v2/models/{name}[/versions/{v}][/ready|/infer] -> (what, name, version)."""
    parts = path[len(_MODEL_PREFIX):].split("/")
    name, version = parts[0], None
    rest = parts[1:]
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        version, rest = rest[1], rest[2:]
    if not name or len(rest) > 1:
        return None
    what = rest[0] if rest else "metadata"
    if what not in ("metadata", "ready", "infer") or (rest and what == "metadata"):
        return None
    return what, name, version


def _is_single(inputs: Any) -> bool:
    """One row: a mapping of scalars, or a flat list of numbers (a signal window / a row)."""
    if isinstance(inputs, dict):
        return not any(isinstance(v, list) for v in inputs.values())
    return isinstance(inputs, list) and bool(inputs) and not isinstance(inputs[0], (list, dict))


@dataclass(frozen=True, slots=True)
class _Body:
    data: bytes
    #: Inference-Header-Content-Length: the JSON's size when binary tensors follow it
    header_length: int | None


class _App:
    """The ASGI callable; one per agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.limit = agent.config.http.max_body_bytes
        self._sig_model: LoadedModel | None = None
        self._sig: ModelSignature | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        try:
            status, body, headers = await self._dispatch(scope, receive)
        except InputError as err:
            status, body, headers = _error(400, str(err))
        except NotReadyError as err:
            status, body, headers = _error(503, str(err))
        except FeedbackError as err:
            status, body, headers = _error(err.status, str(err))
        except Exception as err:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            status, body, headers = _error(500, f"internal error: {type(err).__name__}: {err}")
        if status >= 400 and log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %d %s", scope["method"], scope["path"], status, body[:300])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _signature(self, loaded: LoadedModel) -> ModelSignature:
        if loaded is not self._sig_model or self._sig is None:
            self._sig = ModelSignature.from_manifest(loaded.bundle.manifest)
            self._sig_model = loaded
        return self._sig

    async def _dispatch(self, scope: Scope, receive: Receive) -> Response:
        path: str = scope["path"]
        fixed = _FIXED.get(path)
        name = version = None
        if fixed is not None:
            what, allowed = fixed
        elif path.startswith(_MODEL_PREFIX) and (route := _model_route(path)) is not None:
            what, name, version = route
            allowed = "POST" if what == "infer" else "GET"
        else:
            return _error(404, f"no such endpoint: {path!r:.200}; see /v2 (Open Inference "
                          "Protocol), /v1/predict, /feedback, /v1/status")
        if allowed == "GET|POST":
            allowed = scope["method"] if scope["method"] in ("GET", "POST") else "GET, POST"
        if scope["method"] != allowed:
            return _error(405, f"{scope['method']} is not allowed on {path}; use {allowed}",
                          (b"allow", allowed.encode()))
        if allowed == "GET":
            return self._get(what, name, version)
        read = await self._read_body(scope, receive)
        if not isinstance(read, _Body):
            return read
        if what == "infer":
            assert name is not None
            return self._infer(name, version, read.data, read.header_length)
        doc = _json_object(read.data)
        if what == "swap":
            # staging downloads and loads a model: off the event loop, serving goes on
            return await asyncio.to_thread(self._swap, doc)
        return self._predict(doc) if what == "predict" else self._feedback(doc)

    def _swap(self, doc: dict[str, Any]) -> Response:
        try:
            result = self.agent.swap.handle(parse_command(doc))
        except SwapInterrupted as err:
            return _json(503, {"error": str(err),
                               "phase": self.agent.swap.state.phase.value})
        return _json(409 if result.outcome == "refused" else 200, result.to_dict())

    # --- bodies ----------------------------------------------------------------------------

    async def _read_body(self, scope: Scope, receive: Receive) -> _Body | Response:
        declared = header_length = encoding = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == b"inference-header-content-length":
                header_length = value
            elif key == b"content-encoding":
                encoding = value.lower()
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return self._too_big(int(declared))
        msg = await receive()
        body: bytes = msg.get("body", b"")
        if msg.get("more_body", False):  # chunked, or bigger than one read
            parts, size = [body], len(body)
            while msg.get("more_body", False) and size <= self.limit:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return _error(400, "the client disconnected before sending the whole body")
                chunk = msg.get("body", b"")
                size += len(chunk)
                parts.append(chunk)
            if size > self.limit:
                return self._too_big(size, at_least=msg.get("more_body", False))
            body = b"".join(parts)
        elif len(body) > self.limit:  # chunked without Content-Length, all in one read
            return self._too_big(len(body))
        if encoding not in (None, b"identity"):
            inflated = self._inflate(body, encoding)
            if isinstance(inflated, tuple):
                return inflated
            body = inflated
        length: int | None = None
        if header_length is not None:
            try:
                length = int(header_length)
            except ValueError:
                return _error(400, f"Inference-Header-Content-Length = {header_length!r:.40}: "
                              "expected the JSON header's size in bytes")
        return _Body(body, length)

    def _inflate(self, body: bytes, encoding: bytes) -> bytes | Response:
        wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding)
        if wbits is None:
            return _error(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not "
                          "supported; send gzip, deflate or an uncompressed body")
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, self.limit + 1)
        except zlib.error as err:
            return _error(400, f"the {encoding.decode()} body cannot be decompressed: {err}")
        if len(out) > self.limit:
            return self._too_big(len(out), at_least=True, what="decompressed body")
        return out

    def _too_big(self, size: int, *, at_least: bool = False, what: str = "body") -> Response:
        # close the connection: the rest of an over-size body is not worth reading
        return _error(413, f"request {what} of {'at least ' if at_least else ''}{size} bytes is "
                      f"over the limit of {self.limit} bytes (http.max_body_bytes); send fewer "
                      "rows per request or raise the limit", (b"connection", b"close"))

    # --- handlers --------------------------------------------------------------------------

    def _get(self, what: str, name: str | None, version: str | None) -> Response:
        agent = self.agent
        if what == "live":
            return _json(200, {"live": True})
        if what == "health":
            agent.serving()  # NotReadyError -> 503 naming why
            return _json(200, {"ready": True})
        if what == "server":
            return _json(200, {"name": "edgefleet", "version": VERSION,
                               "extensions": ["binary_tensor_data"]})
        if what == "status":
            return _json(200, agent.status())
        if what == "swap":
            return _json(200, {"phase": agent.swap.state.phase.value, "active": agent.active,
                               "state": agent.swap.state.to_dict()})
        assert name is not None
        loaded = self._model(name, version)
        if isinstance(loaded, tuple):
            return loaded
        if what == "ready":
            return _json(200, {"name": name, "ready": True})
        return _json(200, self._signature(loaded).metadata())

    def _model(self, name: str, version: str | None) -> LoadedModel | Response:
        try:
            loaded = self.agent.serving()
        except NotReadyError as err:
            return _error(404, f"model {name!r} is not served: {err}")
        if name != loaded.name or (version is not None and version != loaded.version):
            asked = name if version is None else f"{name} version {version}"
            return _error(404, f"model {asked!r} is not served; this agent serves "
                          f"{loaded.name!r} version {loaded.version!r}")
        return loaded

    def _infer(self, name: str, version: str | None, body: bytes,
               header_length: int | None) -> Response:
        loaded = self.agent.serving()  # 503 before 404: the model may simply not be up yet
        if name != loaded.name or (version is not None and version != loaded.version):
            found = self._model(name, version)
            assert isinstance(found, tuple)
            return found
        request = decode_infer_request(body, header_length, self._signature(loaded))
        result = self.agent.predict(request.inputs)
        payload, json_length = encode_infer_response(result, request)
        if json_length is None:
            return 200, payload, [(b"content-type", _JSON),
                                  (b"content-length", b"%d" % len(payload))]
        return 200, payload, [(b"content-type", _OCTETS),
                              (b"inference-header-content-length", b"%d" % json_length),
                              (b"content-length", b"%d" % len(payload))]

    def _predict(self, doc: dict[str, Any]) -> Response:
        extra = sorted(set(doc) - {"inputs"})
        if extra:
            raise InputError(f"unknown field {extra[0]!r}; expected {{\"inputs\": ...}}")
        if "inputs" not in doc:
            raise InputError("\"inputs\" is absent; expected {\"inputs\": {feature: value}} "
                             "(one row), a list of such rows, or a list of samples (signal)")
        inputs = doc["inputs"]
        result = self.agent.predict(inputs)
        rows = self._rows(result)
        model = {"name": result.model_name, "version": result.model_version}
        if _is_single(inputs) and len(rows) == 1:
            return _json(200, {**rows[0], "model": model})
        return _json(200, {"predictions": rows, "model": model})

    def _rows(self, result: PredictResult) -> list[dict[str, Any]]:
        ids, labels = result.ids, result.labels.tolist()
        if result.probabilities is not None:
            classes = self._labels(result)
            return [{"prediction_id": ids[i], "label": labels[i],
                     "probabilities": dict(zip(classes, result.probabilities[i], strict=True)),
                     "value": None} for i in range(result.n)]
        assert result.values is not None
        return [{"prediction_id": ids[i], "label": labels[i], "probabilities": None,
                 "value": result.values[i]} for i in range(result.n)]

    def _labels(self, result: PredictResult) -> tuple[str, ...]:
        for loaded in self.agent.slots.values():
            if (loaded is not None and loaded.name == result.model_name
                    and loaded.version == result.model_version):
                return loaded.bundle.manifest.labels
        raise NotReadyError(f"{result.model_name} {result.model_version} was unloaded while "
                            "answering; retry")

    def _feedback(self, doc: dict[str, Any]) -> Response:
        extra = sorted(set(doc) - {"prediction_id", "label"})
        if extra:
            raise InputError(f"unknown field {extra[0]!r}; expected {{\"prediction_id\": ..., "
                             "\"label\": ...}")
        for key in ("prediction_id", "label"):
            if key not in doc:
                raise InputError(f"{key!r} is absent; expected {{\"prediction_id\": ..., "
                                 "\"label\": ...}")
        return _json(200, self.agent.feedback(doc["prediction_id"], doc["label"]))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InputError(f"request body is not valid JSON ({err}); expected a JSON object"
                         ) from err
    if not isinstance(doc, dict):
        raise InputError(f"request body is a JSON {type(doc).__name__}; expected an object")
    return doc


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(agent: Agent) -> ASGIApp:
    """The ASGI application serving ``agent``."""
    return _App(agent)


# --- running it ----------------------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (no Windows wheels); asyncio's loop works too
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _http_server(agent: Agent) -> HttpServer:
    return HttpServer(create_app(agent), max_body_bytes=agent.config.http.max_body_bytes)


def _bind(host: str, port: int) -> socket.socket:
    """Bind here: a busy port is a ConfigError naming the setting, before anything starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise ConfigError(
            f"http.host/http.port {host}:{port} cannot be bound ({err}); choose a free port "
            "(EDGEFLEET_AGENT_HTTP__PORT) or stop the process holding it") from err


def _url(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return (f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"), port


@dataclass
class RunningServer:
    """A server running in a background thread (tests, the fleet simulator, benchmarks)."""

    url: str
    port: int
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _stop: asyncio.Event = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 10) -> None:
        """Finish in-flight requests, close connections and join the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout + 5)
        if self._thread.is_alive():
            log.warning("HTTP server at %s did not stop in %.1fs", self.url, timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve(server: HttpServer, sock: socket.socket, stop: asyncio.Event,
                 started: Callable[[], None] | None = None,
                 stopping: Callable[[], None] | None = None) -> None:
    await server.start(sock)
    if started is not None:
        started()
    await stop.wait()
    if stopping is not None:
        stopping()
    await server.shutdown()


def serve_in_thread(agent: Agent, host: str = "127.0.0.1", port: int = 0, *,
                    startup_timeout: float = 30) -> RunningServer:
    """Start serving in a daemon thread; return once it accepts connections (port 0: any)."""
    sock = _bind(host, port)
    url, bound = _url(sock)
    server = _http_server(agent)
    loop = _new_loop()
    up = threading.Event()
    holder: list[asyncio.Event] = []
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        holder.append(stop)
        try:
            loop.run_until_complete(_serve(server, sock, stop, up.set))
        except BaseException as err:
            failure.append(err)
        finally:
            sock.close()
            loop.close()
            up.set()

    thread = threading.Thread(target=run, name=f"edgefleet-http-{bound}", daemon=True)
    thread.start()
    if not up.wait(startup_timeout) or failure or not holder:
        why = f": {failure[0]!r}" if failure else f" within {startup_timeout:g}s"
        raise AgentError(f"the HTTP server on {url} did not start{why}")
    log.info("local API listening on %s", url)
    return RunningServer(url, bound, loop, holder[0], thread)


def _tune_gc() -> None:
    """A long-running server: move everything loaded so far (models, modules) out of the
    collector's sight, and collect the young generation less often. Each request allocates a
    few short-lived containers; with the defaults a full collection walking every loaded object
    lands on some request and doubles the p99 (measured with the agent benchmark)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def serve_forever(agent: Agent, host: str, port: int, *,
                  install_signal_handlers: bool = True) -> None:
    """Serve until SIGTERM or SIGINT; return once the server has shut down (the agent stays
    open, so the caller flushes and closes it)."""
    sock = _bind(host, port)
    url, _ = _url(sock)
    server = _http_server(agent)
    loop = _new_loop()
    _tune_gc()

    async def main() -> None:
        stop = asyncio.Event()
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        log.info("local API listening on %s", url)
        # a swap stage in flight stops downloading now, so the drain below need not wait
        # for it (its request is answered 503; the next start resumes the download)
        await _serve(server, sock, stop, stopping=agent.swap.interrupt)

    try:
        loop.run_until_complete(main())
    finally:
        sock.close()
        loop.close()
    log.info("local API on %s stopped", url)

"""Staging from a URL: the download resumes where a broken connection left it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import BundleError
from edge_agent.swap_runner import download


def _head(handler: BaseHTTPRequestHandler, payload: bytes, ranges: list[str | None]) -> bytes:
    """Answer a GET's head for ``payload`` (206 with the rest for a ``Range: bytes=N-``
    request), note the Range asked for, and return the body to send."""
    rng = handler.headers.get("Range")
    ranges.append(rng)
    start = int(rng.split("=")[1].split("-")[0]) if rng else 0
    body = payload[start:]
    handler.send_response(206 if rng else 200)
    handler.send_header("Content-Length", str(len(body)))
    if rng:
        handler.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
    handler.end_headers()
    return body


class _Server:
    """Serves one payload with Range support; can cut the first response short."""

    def __init__(self, payload: bytes, cut_after: int | None) -> None:
        self.payload = payload
        self.cut_after = cut_after
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                body = _head(self, outer.payload, outer.ranges)
                if outer.cut_after is not None:
                    self.wfile.write(body[: outer.cut_after])
                    outer.cut_after = None
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/b.edgebundle"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(small_bundle: Any) -> Iterator[_Server]:
    s = _Server(small_bundle.path.read_bytes(), cut_after=5000)
    yield s
    s.close()


def test_download_resumes_with_range(server: _Server, tmp_path: Path,
                                     small_bundle: Any) -> None:
    """A connection cut mid-body fails with a clear error; the retry asks only for the rest."""
    dest = tmp_path / "b.part"
    with pytest.raises(BundleError, match=r"download of .* failed"):
        download(server.url, dest, timeout=10)
    assert dest.stat().st_size == 5000
    download(server.url, dest, timeout=10)
    assert dest.read_bytes() == small_bundle.path.read_bytes()
    assert server.ranges == [None, "bytes=5000-"]


def test_local_file_and_missing_file(tmp_path: Path, small_bundle: Any) -> None:
    """A local path is copied; a missing one is named in the error."""
    dest = tmp_path / "c.part"
    download(str(small_bundle.path), dest)
    assert dest.read_bytes() == small_bundle.path.read_bytes()
    with pytest.raises(BundleError, match="does not exist"):
        download(str(tmp_path / "nope.edgebundle"), tmp_path / "d.part")


def test_stage_from_url_survives_a_broken_connection(tmp_path: Path, keypair: Any,
                                                     small_bundle: Any,
                                                     compile_fast: Any) -> None:
    """Staging over HTTP retries a cut download with a Range request and ends staged."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from edge_agent.swap_events import Stage, SwapPhase
    from tests.conftest import make_classification_data

    X, y = make_classification_data(n=600, d=6, seed=11)
    v2 = compile_fast(LogisticRegression(C=0.5).fit(X[:400], y[:400]), X, y, name="small",
                      version="1.4.0")
    srv = _Server(v2.path.read_bytes(), cut_after=3000)
    try:
        cfg = AgentConfig(data_dir=tmp_path / "data", trusted_keys=(keypair.public_path,),
                          bundle=small_bundle.path)
        with Agent(cfg, start_writer=False) as agent:
            agent.swap.handle(Stage(id="url-1", source=srv.url))
            assert agent.swap.state.phase is SwapPhase.STAGED
            assert agent.slots["green"] is not None and agent.slots["green"].version == "1.4.0"
            assert srv.ranges == [None, "bytes=3000-"]
            probabilities = agent.predict(X[450]).probabilities
            assert probabilities is not None and np.isfinite(probabilities).all()
    finally:
        srv.close()


class _Trickle:
    """Serves one payload: a first request sends ``first`` bytes, then one more piece once
    ``more`` is set, then waits (the agent is to stop reading by then); a Range request gets
    the rest at once."""

    def __init__(self, payload: bytes, first: int, piece: int) -> None:
        self.payload = payload
        self.ranges: list[str | None] = []
        self.sent_first = threading.Event()
        self.more = threading.Event()
        self.done = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                body = _head(self, outer.payload, outer.ranges)
                if outer.ranges[-1]:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:first])
                self.wfile.flush()
                outer.sent_first.set()
                outer.more.wait(30)
                self.wfile.write(body[first:first + piece])
                self.wfile.flush()
                outer.done.wait(30)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/b.edgebundle"

    def close(self) -> None:
        self.more.set()
        self.done.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_shutdown_stops_a_download_and_the_next_start_resumes_it(
        tmp_path: Path, keypair: Any, small_bundle: Any, compile_fast: Any) -> None:
    """Closing the agent while a stage downloads stops the download at its next read (the
    bytes so far kept, no failure recorded: the state stays staging), so close does not wait
    for the download; the next start resumes it with a Range request and ends staged."""
    from sklearn.linear_model import LogisticRegression

    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from edge_agent.swap_events import Stage, SwapPhase
    from edge_agent.swap_runner import SwapInterrupted
    from tests.conftest import make_classification_data

    X, y = make_classification_data(n=600, d=6, seed=11)
    v2 = compile_fast(LogisticRegression(C=0.25).fit(X[:400], y[:400]), X, y, name="small",
                      version="1.5.0")
    payload = v2.path.read_bytes()
    srv = _Trickle(payload, first=2000, piece=500)
    cfg = AgentConfig(data_dir=tmp_path / "data", trusted_keys=(keypair.public_path,),
                      bundle=small_bundle.path)
    outcome: list[BaseException | str] = []
    try:
        agent = Agent(cfg, start_writer=False)

        def stage() -> None:
            try:
                agent.swap.handle(Stage(id="url-2", source=srv.url))
                outcome.append("finished")
            except BaseException as err:  # what the test is about
                outcome.append(err)

        stager = threading.Thread(target=stage)
        try:
            stager.start()
            assert srv.sent_first.wait(30), "the agent never started the download"
            agent.swap.interrupt()  # the SIGTERM path calls this first
            srv.more.set()  # the next read returns: the download sees the interrupt
            stager.join(30)
            assert not stager.is_alive()
            (err,) = outcome
            assert isinstance(err, SwapInterrupted), err
            assert "shutting down; it resumes at the next start" in str(err)
            assert agent.swap.state.phase is SwapPhase.STAGING
        finally:
            agent.close()
        (part,) = (tmp_path / "data" / "downloads").glob("*.part")
        kept = part.stat().st_size
        assert 2000 <= kept < len(payload)
        assert part.read_bytes() == payload[:kept]

        srv.done.set()
        with Agent(cfg, start_writer=False) as again:  # the start resumes the stage
            assert again.swap.state.phase is SwapPhase.STAGED
            green = again.slots["green"]
            assert green is not None and green.version == "1.5.0"
        assert srv.ranges == [None, f"bytes={kept}-"]
    finally:
        srv.close()

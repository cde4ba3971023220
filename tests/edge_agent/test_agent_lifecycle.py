"""The agent's life cycle, end to end: how its database is opened (WAL, synchronous=FULL, a
corrupt file moved aside), a graceful SIGTERM (stop accepting, flush on close), serving while
the writer is stuck on the disk, onnxruntime's thread settings, and a restart after `agent
warmup` that compiles nothing.

Real bundles (small sklearn models compiled by the conftest fixtures), real SQLite files, real
processes and a real HTTP server on a free loopback port.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.conftest import make_classification_data
from tests.edge_agent.conftest import Served

ROOT = Path(__file__).resolve().parents[2]
#: what the store names a quarantined database (edge_agent.store: agent.db.corrupt-<time>)
CORRUPT_NAME = re.compile(r"agent\.db\.corrupt-\d{8}T\d{6}(-\d+)?")


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it is truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, keypair: Any, bundle: Path | None, *, flush: float = 0.05,
            window: float = 300, **sections: Any) -> Any:
    from edge_agent.config import AgentConfig, TelemetryConfig

    return AgentConfig(data_dir=tmp_path / "data", trusted_keys=(keypair.public_path,),
                       bundle=bundle, telemetry=TelemetryConfig(
                           window_seconds=window, flush_interval_seconds=flush), **sections)


def _row(x: np.ndarray) -> dict[str, float]:
    return {f"f{i}": float(v) for i, v in enumerate(x)}


def _predict(conn: http.client.HTTPConnection, inputs: Any) -> Any:
    """POST /v1/predict on a keep-alive connection; the answer's body, which must be a 200."""
    conn.request("POST", "/v1/predict", orjson.dumps({"inputs": inputs}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200, body
    return body


def _pragmas(conn: sqlite3.Connection) -> tuple[str, int]:
    return (conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0])


def _read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)


def _logged_predictions(db: Path) -> int:
    conn = _read_only(db)
    try:
        return int(conn.execute("SELECT COALESCE(SUM(n), 0) FROM predictions").fetchone()[0])
    finally:
        conn.close()


SYNCHRONOUS_FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


# --- 1. the database: WAL + synchronous=FULL on the agent's own connections ---------------------


class _NoWalConnection(sqlite3.Connection):
    """A connection on a file system where WAL cannot work: SQLite answers the request for WAL
    with the journal mode it keeps (here by hand: a local disk always supports WAL)."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.strip().upper() == "PRAGMA JOURNAL_MODE = WAL":
            return super().execute("PRAGMA journal_mode")
        return super().execute(sql, *args)


def test_a_database_that_cannot_use_wal_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where WAL cannot be had, the store still opens and commits (durable with FULL) but
    says so in the log, naming the mode it got, instead of silently running without WAL."""
    from edge_agent import store as store_module

    def connect(path: Path) -> sqlite3.Connection:
        return sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                               timeout=5.0, factory=_NoWalConnection)

    monkeypatch.setattr(store_module, "_connect", connect)
    with caplog.at_level("WARNING", logger="edge_agent.store"):
        s = store_module.AgentStore(tmp_path / "agent.db")
    try:
        assert s.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert s.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        s.close()
    (warning,) = [r for r in caplog.records if "journal_mode" in r.getMessage()]
    assert "journal_mode is 'delete', not WAL" in warning.getMessage()


def test_agent_connections_are_wal_with_synchronous_full(
        tmp_path: Path, keypair: Any, small_bundle: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite connection the agent opens, and the one its writer thread commits through,
    is in WAL mode with synchronous=FULL (per connection: a fresh connection proves nothing
    about the writer's). The README's power-cut bound rests on it."""
    from edge_agent.agent import Agent

    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def recording_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", recording_connect)
    agent = Agent(_config(tmp_path, keypair, small_bundle.path))
    monkeypatch.setattr(sqlite3, "connect", connect)
    try:
        store_conn = agent.store.db.conn
        assert any(c is store_conn for c in opened), "the store's connection was not opened here"
        # prove that store_conn is the writer's: watch the writer thread commit through it
        traced: list[tuple[str, str]] = []
        lock = threading.Lock()

        def trace(statement: str) -> None:
            with lock:
                traced.append((threading.current_thread().name, statement))

        with agent.store.reading() as conn:
            conn.set_trace_callback(trace)
        X, _ = make_classification_data(n=600, d=6, seed=11)
        agent.predict(_row(X[0]))

        def writer_logged() -> bool:
            with lock:
                return any(name == "edgefleet-writer" and "INTO predictions" in stmt
                           for name, stmt in traced)

        _wait(writer_logged, 30, "the writer thread to log the prediction")
        with agent.store.reading() as conn:
            conn.set_trace_callback(None)
        live = []
        for conn in opened:
            try:
                conn.execute("SELECT 1")
            except sqlite3.ProgrammingError:  # closed (e.g. a corrupt file's first look)
                continue
            live.append(conn)
        assert live, "the agent keeps no connection open"
        with agent.store.reading():  # the writer shares this connection: hold its lock
            for conn in live:
                assert _pragmas(conn) == ("wal", SYNCHRONOUS_FULL)
        # and the file itself is in WAL mode, for every reader that opens it
        fresh = sqlite3.connect(agent.config.db_path)
        try:
            assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            fresh.close()
    finally:
        agent.close()


def _damaged_pages(path: Path) -> bytes:
    """A real agent database whose pages after the first are overwritten (header intact)."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) >= 3 * page, "expected a database of several pages"
    for start in range(page, len(data), page):
        data[start:start + page] = bytes([0xA5]) * page
    return bytes(data)


@pytest.mark.parametrize("damage", ["garbage", "damaged pages"])
def test_corrupt_database_is_moved_aside_and_a_fresh_one_started(
        tmp_path: Path, keypair: Any, small_bundle: Any, damage: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A database failing `PRAGMA quick_check` at start is renamed agent.db.corrupt-<time>
    (its -wal and -shm beside it), byte for byte, and the agent starts on a new database
    (WAL, synchronous=FULL) and serves, instead of crash-looping."""
    from edge_agent.agent import Agent

    config = _config(tmp_path, keypair, small_bundle.path)
    db = config.db_path
    if damage == "garbage":
        db.parent.mkdir(parents=True)
        bad = b"not an SQLite database\n" * 100 + np.random.default_rng(1).bytes(8192)
        wal_bytes = b"a write-ahead log nobody can replay" * 40
    else:
        # a power cut's leftovers: a database and the WAL holding its last commits, copied
        # while the agent runs; then pages of the database file go bad
        first = Agent(config, start_writer=False)
        X, _ = make_classification_data(n=600, d=6, seed=11)
        first.predict(X[:50])
        first.flush()
        with first.store.reading() as conn:  # the schema and those rows into the file
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        first.predict(X[50:80])
        first.flush()
        bad = _damaged_pages(db)
        wal_bytes = Path(f"{db}-wal").read_bytes()
        assert wal_bytes, "expected the last commits in the WAL"
        first.close()
    db.write_bytes(bad)
    Path(f"{db}-wal").write_bytes(wal_bytes)

    with caplog.at_level("ERROR", logger="edge_agent.store"):
        agent = Agent(config)
    try:
        moved = agent.store.quarantined
        assert moved is not None and moved.parent == db.parent
        assert CORRUPT_NAME.fullmatch(moved.name), moved.name
        assert moved.read_bytes() == bad
        assert Path(f"{moved}-wal").read_bytes() == wal_bytes
        assert f"moved to {moved}" in caplog.text
        # a new, healthy database, opened as every agent database is
        assert agent.store.integrity_ok()
        with agent.store.reading() as conn:
            assert _pragmas(conn) == ("wal", SYNCHRONOUS_FULL)
        assert agent.ready
        X, _ = make_classification_data(n=600, d=6, seed=11)
        assert agent.predict(_row(X[1])).n == 1
        agent.flush()
        assert _logged_predictions(db) == 1
    finally:
        agent.close()
    kept = {p.name for p in db.parent.iterdir() if p.name.startswith("agent.db.corrupt")}
    assert {moved.name, f"{moved.name}-wal"} <= kept <= {moved.name, f"{moved.name}-wal",
                                                         f"{moved.name}-shm"}
    # the new database never touched them
    assert moved.read_bytes() == bad
    assert Path(f"{moved}-wal").read_bytes() == wal_bytes


def test_two_corrupt_files_in_one_second_are_both_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quarantine name has a one-second stamp: a second corrupt file within that second
    gets its own name instead of replacing the first (rename() would)."""
    from edge_agent import store as store_module
    from edge_agent.store import AgentStore

    monkeypatch.setattr(store_module.time, "strftime", lambda fmt: "20250101T000000")
    db = tmp_path / "agent.db"
    moved = []
    for k in range(2):
        db.write_bytes(b"corrupt %d " % k * 500)
        store = AgentStore(db)
        store.close()
        assert store.quarantined is not None
        moved.append(store.quarantined)
    assert [p.name for p in moved] == ["agent.db.corrupt-20250101T000000",
                                       "agent.db.corrupt-20250101T000000-1"]
    assert [p.read_bytes() for p in moved] == [b"corrupt 0 " * 500, b"corrupt 1 " * 500]


def test_a_locked_database_is_not_taken_for_a_corrupt_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A healthy database another connection holds locked cannot be checked: that is a
    StoreError naming the file, and the database stays where it is, whole (moved aside, the
    agent would start without its windows, slots and swap state)."""
    from edge_agent import store as store_module
    from edge_agent.errors import StoreError
    from edge_agent.store import AgentStore

    db = tmp_path / "agent.db"
    AgentStore(db).close()
    monkeypatch.setattr(store_module, "_BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO events (ts, kind, detail) VALUES (1, 'x', '{}')")
        with pytest.raises(StoreError, match="locked"):
            AgentStore(db)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
    store = AgentStore(db)
    try:
        assert store.quarantined is None and store.integrity_ok()
        assert [e["kind"] for e in store.events()] == ["x"]
    finally:
        store.close()


# --- 2. SIGTERM: stop accepting, answer what is in flight, flush on close ------------------------


class _StalledBundle:
    """An HTTP server whose one URL stalls until released (then 404): a swap stage downloading
    from it keeps a request of the agent in flight for as long as the test wants."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requested.set()
                outer.release.wait(60)
                self.send_error(404, "released")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bundle.edgebundle"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalled_bundle() -> Iterator[_StalledBundle]:
    stalled = _StalledBundle()
    yield stalled
    stalled.close()


def _connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
def test_sigterm_stops_accepting_then_flushes_everything_on_close(
        tmp_path: Path, keypair: Any, small_bundle: Any,
        stalled_bundle: _StalledBundle) -> None:
    """`edgefleet agent run` with a 60 s flush interval (so only the flush on close can write
    what is served here): on SIGTERM the listener closes at once (new connections refused while
    the process is still up, answering a request in flight), that request still gets its
    answer (503: its stage stopped downloading at the signal), the process exits 0, and every
    prediction and the window's counts are in the database."""
    port = _free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "lifecycle"\ndata_dir = "{tmp_path / "data"}"\n'
        f'trusted_keys = ["{keypair.public_path}"]\nbundle = "{small_bundle.path}"\n'
        f"[http]\nport = {port}\n[telemetry]\nwindow_seconds = 3600\n"
        "flush_interval_seconds = 60\n")
    db = tmp_path / "data" / "agent.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "agent", "run", "-c", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    swap_answer: list[tuple[int, dict[str, Any]]] = []
    swap_error: list[BaseException] = []
    try:
        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                probe.request("GET", "/v2/health/ready")
                return probe.getresponse().status == 200
            except OSError:
                return False
            finally:
                probe.close()

        _wait(ready, 120, "the agent to serve")
        X, _ = make_classification_data(n=600, d=6, seed=11)
        ids: list[str] = []
        for x in X[:20]:  # single rows, one keep-alive connection
            ids.append(_predict(conn, _row(x))["prediction_id"])
        batch = _predict(conn, [_row(x) for x in X[20:50]])
        ids.extend(p["prediction_id"] for p in batch["predictions"])
        conn.close()
        assert len(set(ids)) == 50
        # the 60 s writer has not written them: only the flush on close can
        assert _logged_predictions(db) == 0

        def stage() -> None:  # in flight over SIGTERM: a stage downloading a stalled URL
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
                c.request("POST", "/v1/swap", orjson.dumps(
                    {"command": "stage", "id": "st-stall", "source": stalled_bundle.url}),
                    {"Content-Type": "application/json"})
                r = c.getresponse()
                swap_answer.append((r.status, json.loads(r.read())))
                c.close()
            except BaseException as err:
                swap_error.append(err)

        stager = threading.Thread(target=stage, daemon=True)
        stager.start()
        assert stalled_bundle.requested.wait(60), "the agent never started the download"
        assert not _connect_refused(port)  # still accepting before the signal

        proc.send_signal(signal.SIGTERM)
        _wait(lambda: _connect_refused(port), 8, "new connections to be refused after SIGTERM")
        assert proc.poll() is None, "refused only because the process had exited"
        assert not swap_answer and not swap_error  # the request in flight is still waiting

        stalled_bundle.release.set()
        stager.join(120)
        assert not swap_error, swap_error
        assert len(swap_answer) == 1, "the request in flight got no answer"
        status, answer = swap_answer[0]
        # the stage stopped downloading at SIGTERM: 503, and still staging (the next start
        # resumes it)
        assert status == 503 and answer["phase"] == "staging", answer
        assert "shutting down" in answer["error"], answer
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        conn.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    ro = _read_only(db)
    try:
        assert ro.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert int(ro.execute("SELECT COALESCE(SUM(n), 0) FROM predictions").fetchone()[0]) == 50
        windows = ro.execute("SELECT model_name, model_version, rows, metrics FROM windows"
                             ).fetchall()
    finally:
        ro.close()
    assert [(w[0], w[1], w[2]) for w in windows] == [("small", "1.2.0", 50)]
    assert json.loads(windows[0][3])["requests"] == 21  # 20 single rows and one batch

    from edge_agent.store import AgentStore

    store = AgentStore(db)
    try:
        for pid in (ids[0], ids[19], ids[20], ids[49]):
            found = store.prediction(pid)
            assert found is not None and found["model_version"] == "1.2.0", pid
    finally:
        store.close()


# --- 3. serving never waits on the disk ----------------------------------------------------------


def test_serving_goes_on_while_the_writer_is_stuck_in_a_commit(
        serve: Callable[..., Served], small_bundle: Any) -> None:
    """The writer thread is held inside its database transaction (the store's lock taken, a
    write transaction open); meanwhile 500 single-row requests over HTTP and batches (HTTP and
    in-process) all return. Released, the writer commits every one of them."""
    served = serve(small_bundle.path)
    agent = served.agent
    store = agent.store
    inside = threading.Event()
    release = threading.Event()
    returned = threading.Event()
    worth_writing = store._worth_writing

    def stuck(rows: Any) -> Any:
        # called by AgentStore.write inside `with self._lock, self.db.atomic()`, after the
        # window upserts: the writer holds the lock and SQLite's write lock here
        if threading.current_thread().name == "edgefleet-writer" and not release.is_set():
            assert store.db.conn.in_transaction
            inside.set()
            release.wait(120)
            returned.set()
        return worth_writing(rows)

    store._worth_writing = stuck  # type: ignore[method-assign]
    X, _ = make_classification_data(n=600, d=6, seed=11)
    first = agent.predict(_row(X[0]))
    assert inside.wait(30), "the writer never reached its transaction"

    served_ids: list[str] = []
    failures: list[BaseException] = []

    def load() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=30)
            for i in range(500):
                served_ids.append(_predict(conn, _row(X[1 + i % 500]))["prediction_id"])
            body = _predict(conn, [_row(x) for x in X[:100]])
            served_ids.extend(p["prediction_id"] for p in body["predictions"])
            conn.close()
            result = agent.predict(X[:256])
            served_ids.extend(result.ids)
        except BaseException as err:
            failures.append(err)

    client = threading.Thread(target=load, daemon=True)
    client.start()
    client.join(120)
    try:
        assert not client.is_alive(), "serving waited on the stuck writer"
        assert not failures, failures
        assert len(served_ids) == 500 + 100 + 256
        # all of it while the writer is still inside its transaction
        assert inside.is_set() and not returned.is_set() and not release.is_set()
        assert _logged_predictions(agent.config.db_path) == 0
    finally:
        release.set()
    total = 1 + len(served_ids)
    _wait(lambda: _logged_predictions(agent.config.db_path) == total, 30,
          f"the writer to commit all {total} predictions")
    for pid in (first.id, served_ids[0], served_ids[499], served_ids[500], served_ids[-1]):
        assert store.prediction(pid) is not None, pid


# --- 4. runtime threads reach onnxruntime ---------------------------------------------------------


def test_runtime_threads_reach_the_onnxruntime_sessions(
        tmp_path: Path, keypair: Any, small_bundle: Any, compile_fast: Any) -> None:
    """`[runtime] intra_op_threads / inter_op_threads` from agent.toml are the session options
    of the model blue serves and of a bundle staged into green."""
    from sklearn.linear_model import LogisticRegression

    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from edge_agent.swap_events import Stage

    X, y = make_classification_data(n=600, d=6, seed=11)
    v2 = compile_fast(LogisticRegression(C=0.4).fit(X[:400], y[:400]), X, y, name="small",
                      version="1.3.0")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "threads"\ndata_dir = "{tmp_path / "data"}"\n'
        f'trusted_keys = ["{keypair.public_path}"]\nbundle = "{small_bundle.path}"\n'
        "[http]\nenabled = false\n[runtime]\nintra_op_threads = 3\ninter_op_threads = 2\n")
    config = load_config(cfg)
    assert (config.runtime.intra_op_threads, config.runtime.inter_op_threads) == (3, 2)
    with Agent(config, start_writer=False) as agent:
        blue = agent.slots["blue"]
        assert blue is not None
        opts = blue.model.session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (3, 2)
        agent.swap.handle(Stage(id="stage-threads", source=str(v2.path)))
        green = agent.slots["green"]
        assert green is not None and green.version == "1.3.0"
        opts = green.model.session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (3, 2)


# --- 5. after `agent warmup`, a restart compiles nothing -----------------------------------------

RESTART = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    import numpy as np
    logging.basicConfig(level=logging.INFO)
    from edge_agent.cli import _config
    config = _config(Path(sys.argv[1]))  # NUMBA_CACHE_DIR as `agent run` sets it
    from numba.core import event
    from numba.core.registry import CPUDispatcher

    compiled = []

    class Compiles(event.Listener):
        def on_start(self, ev):
            compiled.append(ev.data["dispatcher"].py_func.__qualname__)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Compiles())
    from edge_agent import sketching
    from edge_agent.agent import Agent
    from edge_agent.preprocess import kernels, spectrum

    agent = Agent(config, start_writer=False)
    n = int(sys.argv[2])
    X = np.sin(np.arange(n * 9, dtype=np.float64) * 0.3).reshape(9, n)
    agent.predict(X[0].tolist())
    agent.predict(X)
    agent.flush()  # folds every row into the window's sketches
    (window,) = agent.store.windows()
    agent.close()
    stats = {}
    for module in (kernels, spectrum):
        for name, fn in vars(module).items():
            if isinstance(fn, CPUDispatcher) and fn.signatures:
                s = fn.stats
                stats[f"{module.__name__}.{name}"] = [sum(s.cache_hits.values()),
                                                      sum(s.cache_misses.values())]
    print(json.dumps({"compiled": compiled, "stats": stats, "rows": window.rows,
                      "aot": sketching._KERNELS._aot is not None,
                      "jit_sketch": "edge_agent.sketch_kernels" in sys.modules}))
""")


@pytest.mark.slow
def test_restart_after_warmup_compiles_no_kernel(tmp_path: Path, keypair: Any,
                                                 signal_bundle: Any) -> None:
    """`edgefleet agent warmup`, then a fresh agent process on a numba-preprocessing bundle:
    loading it, a single row, a batch and the flush's fold run every kernel from the data
    dir's cache (numba's cache hits, no miss, no compile event) and the sketch kernels from the
    ahead-of-time build (numba's sketch kernel module never imported)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "warm"\ndata_dir = "{tmp_path / "data"}"\n'
        f'trusted_keys = ["{keypair.public_path}"]\nbundle = "{signal_bundle.path}"\n'
        "[http]\nenabled = false\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    warm = subprocess.run([sys.executable, "-m", "edgefleet", "agent", "warmup", "-c", str(cfg)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr
    assert "sketch kernels: ahead-of-time build" in warm.stdout, warm.stdout + warm.stderr
    out = subprocess.run([sys.executable, "-c", RESTART, str(cfg), "64"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["rows"] == 10  # one row and a batch of 9, folded
    assert report["compiled"] == [], f"compiled at restart: {report['compiled']}"
    assert report["stats"], "no numba preprocessing kernel ran"
    for name, (hits, misses) in report["stats"].items():
        assert misses == 0 and hits >= 1, f"{name}: {hits} cache hits, {misses} misses"
    assert report["aot"] and not report["jit_sketch"]
    cache = tmp_path / "data" / "numba-cache"
    assert f"sketch kernels: ahead-of-time build {cache}" in out.stderr

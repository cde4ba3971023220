"""kill -9 in every state of the swap machine, and between a persisted decision and its actions.

Each case starts a driver subprocess on its own data dir, drives the swap to a kill point, then
SIGKILLs it there (the driver serves live traffic all along). A new agent then starts on the same
data dir, in-process, and must serve exactly one complete, verified model: the one the persisted
swap phase says (green only in ``promoted``), with an intact database and no stray files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.config import AgentConfig
from edge_agent.model import BundleModel
from edge_agent.swap import RESTING, SwapState
from edge_agent.swap_events import SwapPhase
from edge_agent.swap_runner import CHUNK
from tests.conftest import make_classification_data

ROOT = Path(__file__).resolve().parents[2]
P = SwapPhase
BLUE, GREEN = "1.2.0", "1.3.0"

#: the same settings in the driver and in the restarted agent; gates off, so that only the
#: kill decides where the swap stands (the gates have their own tests)
CONFIG: dict[str, Any] = {
    "telemetry": {"window_seconds": 60, "flush_interval_seconds": 0.02},
    "swap": {"min_requests_for_gates": 1_000_000},
}

DRIVER = textwrap.dedent("""
    import json
    import os
    import sys
    import threading
    import time

    import numpy as np

    from edge_agent import swap_events as ev
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from edge_agent.swap_runner import SwapRunner

    data_dir, key, blue, plan = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    never = threading.Event()

    def stop_here(where):
        print("at " + where, flush=True)
        never.wait()  # the test sends SIGKILL while we wait here

    if plan.get("stop_in_first_start"):
        # blue is installed and idle is persisted; stop before the configured bundle is offered
        Agent._offer_as_swap = lambda self, path: stop_here("idle")
    config = AgentConfig.model_validate(
        {"data_dir": data_dir, "trusted_keys": [key], "bundle": blue, **plan["config"]})
    agent = Agent(config)

    def traffic():  # live requests in whatever state the kill lands in
        rows = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
        i = 0
        while True:
            agent.predict(rows[i % 64])
            i += 1
            time.sleep(0.002)  # pacing, so the swap gets the CPU; not a synchronisation

    threading.Thread(target=traffic, daemon=True).start()
    if plan.get("stop_in_action"):
        # stop inside the first action of a decision: its state is persisted, nothing done yet
        action_name, phase = plan["stop_in_action"]
        act = SwapRunner._act

        def stopping_act(self, action):
            if type(action).__name__ == action_name and self.state.phase == phase:
                stop_here(action_name + " in " + phase)
            return act(self, action)

        SwapRunner._act = stopping_act
    make = {"stage": lambda i, a: ev.Stage(id=i, source=a), "shadow": lambda i, a: ev.Shadow(id=i),
            "promote": lambda i, a: ev.Promote(id=i), "commit": lambda i, a: ev.Commit(id=i),
            "rollback": lambda i, a: ev.Rollback(id=i, reason=a or "operator")}
    for n, (kind, arg) in enumerate(plan["commands"]):
        agent.swap.handle(make[kind](f"{kind}-{n}", arg))
    if plan.get("exit_hard"):
        os._exit(3)  # a crash: no close, no flush
    stop_here(agent.swap.state.phase.value)
""")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def green_bundle(compile_fast: Any) -> Any:
    """Version 1.3.0 of 'small': an MLP, so the bundle (~250 KB) spans several download chunks."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = make_classification_data(n=600, d=6, seed=11)
    mlp = MLPClassifier((256, 256), max_iter=30, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = make_pipeline(StandardScaler(), mlp).fit(X[:400], y[:400])
    result = compile_fast(model, X, y, name="small", version=GREEN)
    assert result.bundle_bytes > 3 * CHUNK
    return result


@pytest.fixture(scope="module")
def truncated_bundle(green_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "truncated.edgebundle"
    path.write_bytes(green_bundle.path.read_bytes()[:-100])
    return path


# --- the driver ----------------------------------------------------------------------------


@dataclass
class Driver:
    proc: subprocess.Popen[str]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_marker(self, marker: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == f"at {marker}", f"driver said {line!r}; stderr:\n{self.stderr()}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL
        # the driver's traffic thread prints a traceback if a request ever failed
        assert "Traceback" not in self.stderr(), self.stderr()


@contextlib.contextmanager
def run_driver(data: Path, keypair: Any, blue: Path, plan: dict[str, Any]) -> Iterator[Driver]:
    data.mkdir(parents=True, exist_ok=True)
    stderr_path = data.parent / f"{data.name}-driver-{time.monotonic_ns()}.err"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(data), str(keypair.public_path), str(blue),
             json.dumps({"config": CONFIG, **plan})],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=err,
            text=True)
        try:
            yield Driver(proc, stderr_path)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# --- what a restart must find ---------------------------------------------------------------


def _persisted(data: Path) -> SwapState:
    """The swap state as the kill left it on disk (also checks the database is intact)."""
    conn = sqlite3.connect(data / "agent.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (raw,) = conn.execute("SELECT state FROM swap_state WHERE id = 1").fetchone()
    finally:
        conn.close()
    return SwapState.from_dict(json.loads(raw))  # the constructor checks its invariants


def _config(data: Path, keypair: Any, blue: Path) -> AgentConfig:
    return AgentConfig.model_validate(
        {"data_dir": data, "trusted_keys": [keypair.public_path], "bundle": blue, **CONFIG})


def _assert_one_verified_model_serves(agent: Agent, keypair: Any, phases: set[SwapPhase],
                                      version: str) -> None:
    state = agent.swap.state
    assert state.phase in phases, (state.phase, state.last_reason)
    raw = agent.store.load_swap_state()
    assert raw is not None and SwapState.from_dict(raw) == state  # memory and disk agree
    assert agent.ready
    promoted = state.phase is P.PROMOTED
    slot = "green" if promoted else "blue"
    assert agent.active == slot, f"{agent.active} answers in {state.phase}"
    serving = agent.serving()
    assert serving is agent.slots[slot]
    want = ((state.green_version, state.green_sha256) if promoted
            else (state.blue_version, state.blue_sha256))
    assert (serving.version, serving.sha256) == want, (
        f"{serving.version} serves, the swap state says {want[0]} ({state.phase})")
    assert serving.version == version
    # the file behind the serving model is complete: it verifies and replays its test vectors
    verified = read_bundle(serving.path, [load_public_key(keypair.public_path)])
    assert verified.manifest.model.sha256 == serving.sha256
    assert BundleModel.from_bundle(verified).replay_test_vectors(
        verified.manifest.test_vectors) == []
    X, _ = make_classification_data(n=600, d=6, seed=11)
    answer = agent.predict(X[450])
    assert answer.model_version == version and answer.labels[0] in ("0", "1")
    # what the next start will load is the same blue
    records = agent.store.slots()
    assert records["blue"].sha256 == state.blue_sha256
    assert Path(records["blue"].path).is_file()
    assert agent.store.integrity_ok()
    bundles = {p.name for p in agent.config.bundles_dir.iterdir()}
    loaded = {Path(s.path).name for s in agent.slots.values() if s is not None}
    if state.phase in RESTING:
        assert agent.slots["green"] is None and set(records) == {"blue"}
        assert bundles == loaded == {Path(records["blue"].path).name}
        assert not any((agent.config.data_dir / "downloads").iterdir())
    else:
        named = {Path(state.green_path).name} if state.green_path else set()
        assert bundles <= loaded | named, bundles


def _restart_and_check(data: Path, keypair: Any, blue: Path, phases: set[SwapPhase],
                       version: str) -> None:
    """Two restarts in a row each find one verified model serving (a restart is repeatable)."""
    for _ in range(2):
        with Agent(_config(data, keypair, blue), start_writer=False) as agent:
            _assert_one_verified_model_serves(agent, keypair, phases, version)


# --- the cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """Drive with ``commands``, stop at ``marker`` (optionally inside ``stop_in_action``)."""

    commands: tuple[tuple[str, str], ...]
    marker: str
    killed_in: SwapPhase
    after: frozenset[SwapPhase]
    version: str
    stop_in_action: tuple[str, str] | None = None


STAGE = ("stage", "GREEN")
PROMOTE = ("promote", "")

CASES = [
    pytest.param(Kill((STAGE,), "DownloadAndVerify in staging", P.STAGING,
                      frozenset({P.STAGED}), BLUE, ("DownloadAndVerify", "staging")),
                 id="staging-before-download"),
    pytest.param(Kill((STAGE,), "LoadGreen in staging", P.STAGING, frozenset({P.STAGED}), BLUE,
                      ("LoadGreen", "staging")), id="staging-verified-before-load"),
    pytest.param(Kill((STAGE,), "staged", P.STAGED, frozenset({P.STAGED}), BLUE), id="staged"),
    pytest.param(Kill((STAGE, ("shadow", "")), "shadow", P.SHADOW, frozenset({P.SHADOW}), BLUE),
                 id="shadow"),
    pytest.param(Kill((STAGE, PROMOTE), "SwapToGreen in promoted", P.PROMOTED,
                      frozenset({P.PROMOTED}), GREEN, ("SwapToGreen", "promoted")),
                 id="promote-edge"),
    pytest.param(Kill((STAGE, PROMOTE), "promoted", P.PROMOTED, frozenset({P.PROMOTED}), GREEN),
                 id="promoted"),
    pytest.param(Kill((STAGE, PROMOTE, ("commit", "")), "CommitGreen in committed", P.COMMITTED,
                      frozenset({P.COMMITTED}), GREEN, ("CommitGreen", "committed")),
                 id="commit-edge"),
    pytest.param(Kill((STAGE, PROMOTE, ("commit", "")), "committed", P.COMMITTED,
                      frozenset({P.COMMITTED}), GREEN), id="committed"),
    pytest.param(Kill((STAGE, PROMOTE, ("rollback", "")), "StopShadow in rolling_back",
                      P.ROLLING_BACK, frozenset({P.ROLLED_BACK}), BLUE,
                      ("StopShadow", "rolling_back")), id="rolling_back-rollback-edge"),
    pytest.param(Kill((STAGE, PROMOTE, ("rollback", "")), "rolled_back", P.ROLLED_BACK,
                      frozenset({P.ROLLED_BACK}), BLUE), id="rolled_back"),
    pytest.param(Kill((("stage", "TRUNCATED"),), "failed", P.FAILED, frozenset({P.FAILED}), BLUE),
                 id="failed"),
]


@pytest.mark.parametrize("case", CASES)
def test_kill_in_state(case: Kill, tmp_path: Path, keypair: Any, small_bundle: Any,
                       green_bundle: Any, truncated_bundle: Path) -> None:
    """SIGKILLed at a state or inside a decision's first action, the agent restarts serving
    exactly one verified model: the one the persisted phase names, with nothing left over."""
    data = tmp_path / "data"
    sources = {"GREEN": str(green_bundle.path), "TRUNCATED": str(truncated_bundle)}
    plan = {"commands": [(kind, sources.get(arg, arg)) for kind, arg in case.commands],
            "stop_in_action": case.stop_in_action}
    with run_driver(data, keypair, small_bundle.path, plan) as driver:
        driver.wait_for_marker(case.marker)
        driver.kill()
    killed = _persisted(data)
    assert killed.phase is case.killed_in, killed
    if case.stop_in_action == ("DownloadAndVerify", "staging"):
        assert killed.green_path is None  # persisted, download not begun
    if case.stop_in_action == ("LoadGreen", "staging"):
        assert killed.green_path is not None  # verified on disk, not yet loaded
    _restart_and_check(data, keypair, small_bundle.path, set(case.after), case.version)


def test_kill_in_idle(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """Killed on its first start right after idle was persisted, the agent restarts on blue."""
    data = tmp_path / "data"
    with run_driver(data, keypair, small_bundle.path, {"commands": [],
                                                       "stop_in_first_start": True}) as driver:
        driver.wait_for_marker("idle")
        driver.kill()
    killed = _persisted(data)
    assert killed.phase is P.IDLE and killed.blue_version == BLUE
    # committed: the restart runs the configured bundle through a swap onto itself (see
    # test_first_start_rests_in_idle); either way blue serves and nothing is left over
    _restart_and_check(data, keypair, small_bundle.path, {P.IDLE, P.COMMITTED}, BLUE)


def test_first_start_rests_in_idle(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """A first start installs the configured bundle as blue and rests in idle (cycle 0)."""
    with Agent(_config(tmp_path / "data", keypair, small_bundle.path),
               start_writer=False) as agent:
        kinds = [e["kind"] for e in agent.store.events()]
        assert (agent.swap.state.phase, agent.swap.state.cycle) == (P.IDLE, 0), kinds
        assert "stage" not in kinds


class _StallingBundleServer:
    """Serves one bundle over HTTP with Range support; the first GET stalls mid-body."""

    def __init__(self, payload: bytes, stall_after: int) -> None:
        self.payload = payload
        self.stall_after = stall_after
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                server.ranges.append(asked)
                data = server.payload
                if asked is None and not server.stalled.is_set():
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:server.stall_after])
                    self.wfile.flush()
                    server.stalled.set()
                    server.release.wait(timeout=60)  # the client is killed meanwhile
                    return
                start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if asked else 200)
                if asked:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def test_kill_during_download(tmp_path: Path, keypair: Any, small_bundle: Any,
                              green_bundle: Any) -> None:
    """Killed while an HTTP download of green stalls mid-body, the agent restarts in staging,
    resumes the download with a Range request from the bytes it kept, and stages green."""
    data = tmp_path / "data"
    payload = green_bundle.path.read_bytes()
    server = _StallingBundleServer(payload, stall_after=CHUNK + CHUNK // 2)
    try:
        url = server.url(green_bundle.path.name)
        with run_driver(data, keypair, small_bundle.path,
                        {"commands": [("stage", url)]}) as driver:
            assert server.stalled.wait(timeout=60), driver.stderr()

            def kept() -> int:
                return sum(p.stat().st_size for p in (data / "downloads").glob("*.part"))

            _wait(lambda: kept() >= CHUNK, 30, "the first chunk of the download on disk")
            driver.kill()
        have = kept()
        assert 0 < have < len(payload)
        killed = _persisted(data)
        assert killed.phase is P.STAGING and killed.stage_source == url
        _restart_and_check(data, keypair, small_bundle.path, {P.STAGED}, BLUE)
        assert server.ranges == [None, f"bytes={have}-"]  # resumed, not started over
    finally:
        server.close()


def test_crash_loop_boots_blue(tmp_path: Path, keypair: Any, small_bundle: Any,
                               green_bundle: Any) -> None:
    """A process that dies hard after every start since a promotion boots blue on the start
    that reaches max_starts_before_rollback (3), recording the crash loop as the reason."""
    data = tmp_path / "data"
    promote = [("stage", str(green_bundle.path)), PROMOTE]
    for run, commands in enumerate([promote, [], []]):
        plan = {"commands": commands, "exit_hard": True}
        with run_driver(data, keypair, small_bundle.path, plan) as driver:
            assert driver.proc.wait(timeout=60) == 3, driver.stderr()
            assert "Traceback" not in driver.stderr(), driver.stderr()
        state = _persisted(data)
        assert state.phase is P.PROMOTED and state.start_count_since_promotion == run
    with Agent(_config(data, keypair, small_bundle.path), start_writer=False) as agent:
        _assert_one_verified_model_serves(agent, keypair, {P.ROLLED_BACK}, BLUE)
        state = agent.swap.state
        assert state.last_numbers["starts"] == 3
        (rollback,) = agent.store.events(["rollback"])
        assert rollback["detail"]["trigger"] == "crash_loop"
        assert rollback["detail"]["reason"].startswith("crash loop: start 3 since the promotion")
        (done,) = agent.store.events(["rolled_back"])
        assert done["detail"]["cause"].startswith("crash loop")
        assert len(state.auto_rollback_times) == 1  # counted by the rollback-loop guard
    _restart_and_check(data, keypair, small_bundle.path, {P.ROLLED_BACK}, BLUE)



def test_restart_keeps_a_commit_over_an_older_configured_bundle(
        tmp_path: Path, keypair: Any, small_bundle: Any, green_bundle: Any) -> None:
    """A commit from the hub survives restarts of an agent whose config still names the older
    bundle it was installed with, however many commands it answered since."""
    from edge_agent.swap import RECENT_COMMANDS, CommandRecord
    from edge_agent.swap_events import Commit, Promote, Stage

    cfg = _config(tmp_path / "data", keypair, small_bundle.path)
    with Agent(cfg, start_writer=False) as agent:
        agent.swap.handle(Stage(id="s1", source=str(green_bundle.path)))
        agent.swap.handle(Promote(id="p1"))
        agent.swap.handle(Commit(id="c1"))
        # what RECENT_COMMANDS later commands leave behind (sending them costs an fsync each)
        later = tuple(CommandRecord(f"later-{i}", "refused", "already committed")
                      for i in range(RECENT_COMMANDS))
        agent.store.save_swap_state(replace(agent.swap.state, recent_commands=later).to_dict(),
                                    [])
    with Agent(cfg, start_writer=False) as agent:
        _assert_one_verified_model_serves(agent, keypair, {P.COMMITTED}, GREEN)
        assert agent.refusals == []

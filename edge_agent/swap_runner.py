"""The runner around the pure swap machine: SQLite, files, downloads, onnxruntime, the clock.

For every event: ``transition`` decides; the new state is committed to SQLite (with the events it
records) *before* any action runs; then the actions run in order. An action that produces an
outcome (a download verified, test vectors passed) feeds it back as the next event. A restart
feeds :class:`AgentStarted`, whose resume actions bring the device back to what the persisted
state says — so a kill at any point leaves exactly one complete, verified model serving.

Which slot answers is derived, never stored twice: green answers in ``promoted``; blue in every
other phase.

Shutting down (:meth:`SwapRunner.interrupt`, then :meth:`SwapRunner.close`): a download in
progress stops at its next read (within the download timeout, 30 s, when the server sends
nothing at all) and raises :class:`SwapInterrupted` out of ``handle``; nothing is recorded, so the
persisted state still says ``staging`` and the next start resumes the download where the partial
file ends. Without this a SIGTERM during a slow download waited for it to finish (three
attempts), and the stage then wrote to a closed database.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.bundle import read_bundle
from edge_agent.errors import AgentError, BundleError
from edge_agent.swap import Decision, SwapState, transition
from edge_agent.swap_events import (
    Action,
    AgentStarted,
    CommitGreen,
    DeleteGreenFiles,
    DownloadAndVerify,
    Event,
    GreenTestVectorsFailed,
    GreenTestVectorsPassed,
    HealthStats,
    LoadGreen,
    RecordEvent,
    ReportAck,
    RollbackDone,
    RollbackFailed,
    StageFailed,
    StageVerified,
    StartShadow,
    StopShadow,
    SwapPhase,
    SwapPolicy,
    SwapToBlue,
    SwapToGreen,
    UnloadGreen,
    as_json,
    judge_health,
)

if TYPE_CHECKING:
    from edge_agent.agent import Agent

__all__ = ["SwapInterrupted", "SwapResult", "SwapRunner", "download"]

log = logging.getLogger(__name__)

CHUNK = 1 << 16


class SwapInterrupted(AgentError):
    """The agent is shutting down: the swap action in progress stopped, and resumes from the
    persisted state at the next start."""


@dataclass(frozen=True)
class SwapResult:
    """What one command led to: its outcome, the acks sent, and the state after it."""

    outcome: str
    reason: str
    acks: tuple[dict[str, Any], ...]
    state: SwapState

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reason": self.reason, "acks": list(self.acks),
                "phase": self.state.phase.value, "state": self.state.to_dict()}


def download(source: str, dest: Path, *, timeout: float = 30.0,
             cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Fetch a bundle to ``dest``: a local path is copied, an http(s) URL is downloaded and
    resumed with a Range request when ``dest`` already holds part of it. ``cancelled`` is asked
    after every read (what arrived so far is kept): SwapInterrupted once it says so."""
    if not source.startswith(("http://", "https://")):
        src = Path(source.removeprefix("file://"))
        if not src.is_file():
            raise BundleError(f"bundle {src} does not exist")
        shutil.copyfile(src, dest)
        return dest
    have = dest.stat().st_size if dest.exists() else 0
    req = urllib.request.Request(source, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resumed = bool(have) and resp.status == 206
            expected = resp.headers.get("Content-Length")
            got = 0
            with dest.open("ab" if resumed else "wb") as fh:
                # read1: whatever has arrived, up to CHUNK (read(CHUNK) waits for all of it)
                while chunk := resp.read1(CHUNK):
                    fh.write(chunk)
                    got += len(chunk)
                    if cancelled():
                        raise SwapInterrupted(
                            f"download of {source} stopped after {got} bytes: the agent is "
                            "shutting down; it resumes at the next start")
                fh.flush()
            # urllib returns a short body without complaint when the peer closes early
            if expected is not None and got < int(expected):
                raise BundleError(
                    f"download of {source} failed: connection closed after {got} of "
                    f"{expected} bytes; it resumes on retry")
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # already complete
            return dest
        raise BundleError(f"download of {source} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise BundleError(f"download of {source} failed: {err}; it resumes on retry") from err
    return dest


class SwapRunner:
    """Carries out swap commands on one agent, persisting the state before each action."""

    def __init__(self, agent: Agent, policy: SwapPolicy,
                 clock: Callable[[], float] = time.time) -> None:
        self.agent = agent
        self.policy = policy
        self.clock = clock
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self.download_attempts = 3
        self.downloads = agent.config.data_dir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        raw = agent.store.load_swap_state()
        if raw is None:
            blue = agent.slots["blue"]
            self.state = SwapState.initial(
                blue_version=blue.version if blue else None,
                blue_sha256=blue.sha256 if blue else None, now=clock())
            agent.store.save_swap_state(self.state.to_dict(), [])
        else:
            self.state = SwapState.from_dict(raw)
        self.acks: list[dict[str, Any]] = []

    # --- shutting down -------------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop the action in progress at its next step (the SIGTERM path; see the module
        docstring); returns at once."""
        self._closing.set()

    def close(self, timeout: float = 40.0) -> bool:
        """:meth:`interrupt`, then wait up to ``timeout`` s for the event being handled;
        whether none is running any more (the agent closes its database after this)."""
        self._closing.set()
        if not self._lock.acquire(timeout=timeout):
            log.warning("a swap action is still running %.0f s after shutdown began", timeout)
            return False
        self._lock.release()
        return True

    # --- events --------------------------------------------------------------------------

    def start(self) -> SwapResult:
        """Feed AgentStarted (counted and persisted before green is loaded again)."""
        return self.handle(AgentStarted())

    def handle(self, event: Event) -> SwapResult:
        """Decide, persist, act; follow-up outcomes are handled in turn."""
        with self._lock:
            first: Decision | None = None
            acks: list[dict[str, Any]] = []
            queue: list[Event] = [event]
            while queue:
                decision = transition(self.state, queue.pop(0), self.clock(), self.policy)
                first = first or decision
                records = [a for a in decision.actions if isinstance(a, RecordEvent)]
                if decision.state != self.state or records:
                    self.agent.store.save_swap_state(
                        decision.state.to_dict(), [(r.kind, dict(r.detail)) for r in records])
                    self.state = decision.state
                for action in decision.actions:
                    if isinstance(action, ReportAck):
                        acks.append({"command_id": action.command_id, "status": action.status,
                                     "reason": action.reason})
                        continue
                    if isinstance(action, RecordEvent):
                        continue
                    follow = self._act(action)
                    if follow is not None:
                        queue.append(follow)
                        if isinstance(follow, (StageFailed, GreenTestVectorsFailed,
                                               RollbackFailed)):
                            break  # an action failed: stop here, the failure event decides
            assert first is not None
            self.acks.extend(acks)
            return SwapResult(first.outcome, first.reason, tuple(acks), self.state)

    # --- actions -------------------------------------------------------------------------

    def _act(self, action: Action) -> Event | None:
        agent = self.agent
        cycle = self.state.cycle
        log.info("swap action %s", as_json(action))
        if isinstance(action, DownloadAndVerify):
            return self._download_and_verify(action)
        if isinstance(action, LoadGreen):
            return self._load_green(action)
        if isinstance(action, StartShadow):
            agent.set_shadow(True)
        elif isinstance(action, StopShadow):
            agent.set_shadow(False)
        elif isinstance(action, SwapToGreen):
            if agent.slots["green"] is None:
                return RollbackFailed(reason="green is not loaded; cannot serve it", cycle=cycle)
            agent.set_active("green")
        elif isinstance(action, SwapToBlue):
            if agent.slots["blue"] is None:
                return RollbackFailed(reason="blue is not loaded; cannot fall back to it",
                                      cycle=cycle)
            agent.set_active("blue")
            if self.state.phase is SwapPhase.ROLLING_BACK:
                return RollbackDone(cycle=cycle)
        elif isinstance(action, UnloadGreen):
            agent.unload_green()
        elif isinstance(action, DeleteGreenFiles):
            self._delete_unreferenced()
        elif isinstance(action, CommitGreen):
            self._commit_green()
        return None

    def _commit_green(self) -> None:
        """Green becomes blue. A restart between the persisted commit and this action finds the
        old blue loaded and green not: load the committed bundle (the green slot's record) first,
        and delete nothing unless blue is the one the state names."""
        agent = self.agent
        want = self.state.blue_sha256
        blue = agent.slots["blue"]
        if agent.slots["green"] is None and (blue is None or blue.sha256 != want):
            record = agent.store.slots().get("green")
            try:
                if record is None or record.sha256 != want:
                    raise BundleError(f"no green slot record holds the committed model {want}")
                agent.load_green(Path(record.path))
            except AgentError as err:
                log.error("cannot finish the commit of %s: %s; keeping every file", want, err)
                return
        agent.commit_green()
        self._delete_unreferenced()

    def _download_and_verify(self, action: DownloadAndVerify) -> Event:
        # named by source, so any retry of the same source (a restart, a new stage) resumes
        key = hashlib.sha256(action.source.encode()).hexdigest()[:16]
        part = self.downloads / f"{key}.part"
        last: BundleError | None = None
        for attempt in range(self.download_attempts):
            if self._closing.is_set():
                raise SwapInterrupted(f"download of {action.source} not started again: the "
                                      "agent is shutting down; it resumes at the next start")
            try:
                download(action.source, part, cancelled=self._closing.is_set)
                break
            except OSError as err:  # a full disk, an unreadable source: not worth retrying
                return StageFailed(reason=f"cannot fetch {action.source}: {err}",
                                   cycle=action.cycle)
            except BundleError as err:  # the partial file stays for the next attempt
                last = err
                log.warning("download attempt %d of %s failed: %s", attempt + 1,
                            action.source, err)
        else:
            assert last is not None
            return StageFailed(reason=str(last), cycle=action.cycle)
        try:
            # verified before anything is installed: signature, hashes, ONNX allow-list
            verified = read_bundle(part, self.agent.trusted, checked=self.agent.onnx_checked)
        except BundleError as err:
            part.unlink(missing_ok=True)  # complete but bad: never resume into it
            return StageFailed(reason=str(err), cycle=action.cycle)
        m = verified.manifest
        dest = (self.agent.config.bundles_dir
                / f"{m.name}-{m.version}-{m.model.sha256[:8]}.edgebundle")
        try:
            part.replace(dest)
        except OSError as err:
            return StageFailed(reason=f"cannot install {dest}: {err}", cycle=action.cycle)
        return StageVerified(version=m.version, sha256=m.model.sha256, path=str(dest),
                             cycle=action.cycle)

    def _load_green(self, action: LoadGreen) -> Event:
        try:
            self.agent.load_green(Path(action.path))
        except AgentError as err:
            return GreenTestVectorsFailed(reason=str(err), cycle=action.cycle)
        return GreenTestVectorsPassed(cycle=action.cycle)

    def _delete_unreferenced(self) -> None:
        keep = {Path(s.path).resolve() for s in self.agent.slots.values() if s is not None}
        for folder in (self.agent.config.bundles_dir, self.downloads):
            for f in folder.iterdir():
                if f.is_file() and f.resolve() not in keep:
                    with contextlib.suppress(OSError):
                        f.unlink()

    # --- local health gates ---------------------------------------------------------------

    def check_health(self) -> SwapResult | None:
        """After a promotion, judge green's evidence against blue's; trip a rollback if due."""
        with self._lock:
            state = self.state
            if state.phase is not SwapPhase.PROMOTED or state.promoted_at is None:
                return None
            green, blue = self.agent.health_stats(state.promoted_at)
            if green is None:
                return None
            tripped = judge_health(self.policy, green, blue, cycle=state.cycle)
            if tripped is None:
                return None
            log.warning("health gate %s tripped: %s", tripped.gate, tripped.reason)
            return self.handle(tripped)


def stats_of(metrics: list[dict[str, Any]]) -> HealthStats | None:
    """Sum window metrics into one HealthStats (p99 from the merged latency histogram)."""
    from edge_agent.latency import LatencyHistogram

    if not metrics:
        return None
    hist = LatencyHistogram()
    requests = errors = nonfinite = 0
    for m in metrics:
        requests += int(m["requests"])
        errors += int(m["errors"])
        nonfinite += int(m["nonfinite_outputs"])
        hist.merge(LatencyHistogram.from_dict(m["latency_us"]))
    p99 = hist.quantile(0.99) if hist.count else 0.0
    return HealthStats(requests=requests + errors, errors=errors, nonfinite_outputs=nonfinite,
                       p99_us=p99)


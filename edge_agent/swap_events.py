"""The vocabulary of the blue-green swap: its phases, the events it reads, the actions it asks for.

:mod:`edge_agent.swap` holds the machine itself (the state, the transition table and the pure
transition function); this module holds the plain data that goes in and out of it, so that the
runner, the MQTT command adapter and the tests can speak it without importing the machine:
the events and actions, the :class:`SwapPolicy`, the refusal half of the table
(:data:`REFUSED`: every pair the machine does not handle, with its reason) and the pure local
health gates (:func:`judge_health`).

Events are of three kinds:

- **commands** (:class:`Command`) come from an operator or the hub and carry an ``id``; the
  machine answers each with exactly one :class:`ReportAck`, and the same id twice does nothing
  new;
- **outcomes** (:class:`Outcome`) are what the runner observed while carrying out the machine's
  actions (a download verified, test vectors failed, a health gate tripped). Each names the
  rollout ``cycle`` it belongs to, so a late report from an abandoned cycle (a download thread
  that finishes after an operator rolled back) is refused as stale instead of being mistaken for
  the current one;
- :class:`AgentStarted`, fed once at every start of the agent: the crash-loop counter and the
  resumption of whatever the last persisted state was doing.

Actions are data: the runner persists the new state first, then carries them out in order.
When one fails, it stops there and feeds the matching failure outcome back in. Every action is
idempotent, because a restart between the persist and the action repeats it.

Everything here is JSON-friendly (strings, numbers, bools, flat dicts): :func:`as_json` turns an
event or action into a dict for the event log. Events and actions hold dicts, so they compare by
value but are not hashable.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

from edge_agent.errors import AgentError
from fleet_protocol.manifest import semver_key

__all__ = [
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "OUTCOME_TYPES",
    "REFUSED",
    "Action",
    "AgentStarted",
    "Command",
    "Commit",
    "CommitGreen",
    "DeleteGreenFiles",
    "DownloadAndVerify",
    "Event",
    "GreenTestVectorsFailed",
    "GreenTestVectorsPassed",
    "HealthGateTripped",
    "HealthStats",
    "LoadGreen",
    "Outcome",
    "Promote",
    "RecordEvent",
    "ReportAck",
    "Rollback",
    "RollbackDone",
    "RollbackFailed",
    "Shadow",
    "Stage",
    "StageFailed",
    "StageVerified",
    "StartShadow",
    "StopShadow",
    "SwapError",
    "SwapPhase",
    "SwapPolicy",
    "SwapToBlue",
    "SwapToGreen",
    "UnloadGreen",
    "as_json",
    "is_older",
    "judge_health",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 1000


class SwapError(AgentError):
    """A swap event, policy or persisted swap state is malformed (a programming or storage fault).

    Refusals of well-formed commands are not errors: they are decisions with outcome "refused".
    """


class SwapPhase(StrEnum):
    """Where the device is in a rollout; see :mod:`edge_agent.swap` for why each one exists."""

    IDLE = "idle"
    STAGING = "staging"
    STAGED = "staged"
    SHADOW = "shadow"
    PROMOTED = "promoted"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


def _text(what: str, value: object, limit: int = MAX_TEXT_CHARS, *, empty: bool = False) -> None:
    if not isinstance(value, str) or (not empty and not value) or len(value) > limit:
        raise SwapError(
            f"{what} {value!r} is not a {'' if empty else 'non-empty '}string of at most "
            f"{limit} characters"
        )


def check_sha256(what: str, value: object) -> None:
    """Raise :class:`SwapError` unless ``value`` is 64 lowercase hex digits."""
    if not isinstance(value, str) or _SHA256.match(value) is None:
        raise SwapError(f"{what} {value!r} is not a sha256 (64 lowercase hex digits)")


def check_numbers(what: str, numbers: object) -> None:
    """Raise :class:`SwapError` unless ``numbers`` maps strings to finite numbers (JSON-safe)."""
    if not isinstance(numbers, Mapping):
        raise SwapError(f"{what} {numbers!r} is not a mapping of names to numbers")
    for key, value in numbers.items():
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise SwapError(f"{what}[{key!r}] = {value!r} is not a finite number")


def is_older(version: str, than: str | None) -> bool:
    """Whether ``version`` precedes ``than`` (False when ``than`` is None), after checking both.

    SemVer 2.0.0 precedence (§11): ``1.0.0-rc.2 < 1.0.0-rc.10 < 1.0.0``; build data ignored.
    A version that is not SemVer raises ManifestError.
    """
    mine = semver_key(version)
    return than is not None and mine < semver_key(than)


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Event:
    """Base of everything :func:`edge_agent.swap.transition` reads."""


@dataclass(frozen=True)
class Command(Event):
    """An operator or hub command; ``id`` makes it idempotent."""

    id: str

    def __post_init__(self) -> None:
        _text("command id", self.id, MAX_ID_CHARS)


@dataclass(frozen=True)
class Stage(Command):
    """Download, verify, load and test a bundle into the green slot.

    ``version`` is what the sender claims (``None`` when unknown, e.g. a local file); the signed
    manifest's version is checked again once verified. ``force`` is the operator's override of
    the downgrade protection and of the rollback-loop guard.
    """

    source: str
    version: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _text("stage source", self.source)
        if self.version is not None:
            _text("stage version", self.version, MAX_ID_CHARS)
        if not isinstance(self.force, bool):
            raise SwapError(f"stage force {self.force!r} is not a bool")


@dataclass(frozen=True)
class Shadow(Command):
    """Run green beside blue on live traffic; blue still answers."""


@dataclass(frozen=True)
class Promote(Command):
    """Make green answer; blue stays loaded until commit."""


@dataclass(frozen=True)
class Commit(Command):
    """Make green the new blue; the old blue is unloaded and deleted."""


@dataclass(frozen=True)
class Rollback(Command):
    """Make blue answer again and drop green."""

    reason: str = "operator"

    def __post_init__(self) -> None:
        super().__post_init__()
        _text("rollback reason", self.reason, empty=True)


@dataclass(frozen=True, kw_only=True)
class Outcome(Event):
    """Something the runner observed while carrying out an action of rollout ``cycle``."""

    cycle: int

    def __post_init__(self) -> None:
        if isinstance(self.cycle, bool) or not isinstance(self.cycle, int) or self.cycle < 1:
            raise SwapError(f"outcome cycle {self.cycle!r} is not a positive integer")


@dataclass(frozen=True, kw_only=True)
class StageVerified(Outcome):
    """The bundle is on disk at ``path`` and its signature and hashes verified."""

    version: str
    sha256: str
    path: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _text("verified version", self.version, MAX_ID_CHARS)
        check_sha256("verified sha256", self.sha256)
        _text("verified path", self.path)


@dataclass(frozen=True, kw_only=True)
class StageFailed(Outcome):
    """Download or verification failed (bad signature, hash mismatch, no space, timeout)."""

    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _text("stage failure reason", self.reason)


@dataclass(frozen=True, kw_only=True)
class GreenTestVectorsPassed(Outcome):
    """Green loaded and reproduced every test vector of its bundle."""


@dataclass(frozen=True, kw_only=True)
class GreenTestVectorsFailed(Outcome):
    """Green did not load, or did not reproduce its bundle's test vectors."""

    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _text("test vector failure reason", self.reason)


@dataclass(frozen=True, kw_only=True)
class HealthGateTripped(Outcome):
    """A local health gate failed on green's live evidence (see :func:`swap.judge_health`)."""

    gate: Literal["error_rate", "nonfinite", "p99_latency"]
    numbers: Mapping[str, float]
    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate not in ("error_rate", "nonfinite", "p99_latency"):
            raise SwapError(f"gate {self.gate!r} is not error_rate, nonfinite or p99_latency")
        check_numbers("gate numbers", self.numbers)
        _text("gate reason", self.reason)


@dataclass(frozen=True, kw_only=True)
class RollbackDone(Outcome):
    """Blue answers again and green is unloaded and deleted."""


@dataclass(frozen=True, kw_only=True)
class RollbackFailed(Outcome):
    """Blue could not be made to answer (e.g. its files no longer load)."""

    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _text("rollback failure reason", self.reason)


@dataclass(frozen=True)
class AgentStarted(Event):
    """The agent process started (fed once per start, before serving)."""


COMMAND_TYPES: tuple[type[Command], ...] = (Stage, Shadow, Promote, Commit, Rollback)
OUTCOME_TYPES: tuple[type[Outcome], ...] = (
    StageVerified,
    StageFailed,
    GreenTestVectorsPassed,
    GreenTestVectorsFailed,
    HealthGateTripped,
    RollbackDone,
    RollbackFailed,
)
EVENT_TYPES: tuple[type[Event], ...] = (*COMMAND_TYPES, *OUTCOME_TYPES, AgentStarted)


# ---------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class Action:
    """Base of what the runner must do after persisting the new state."""


@dataclass(frozen=True)
class DownloadAndVerify(Action):
    """Fetch ``source`` (resuming a partial download) into the green area and verify it;
    answer with StageVerified or StageFailed for ``cycle``."""

    cycle: int
    source: str


@dataclass(frozen=True)
class LoadGreen(Action):
    """Load the verified bundle at ``path`` into the green slot and replay its test vectors;
    answer with GreenTestVectorsPassed or GreenTestVectorsFailed for ``cycle``."""

    cycle: int
    path: str


@dataclass(frozen=True)
class StartShadow(Action):
    """Send live requests to green too; blue's answer is the one returned."""


@dataclass(frozen=True)
class StopShadow(Action):
    """Stop sending live requests to green (a no-op when shadow is not running)."""


@dataclass(frozen=True)
class SwapToGreen(Action):
    """Point serving at green (one reference swap); blue stays loaded."""


@dataclass(frozen=True)
class SwapToBlue(Action):
    """Point serving at blue, loading blue first if a restart unloaded it. It is issued only
    with the rest of a rollback (StopShadow, SwapToBlue, UnloadGreen, DeleteGreenFiles): once
    all of them ran the runner answers RollbackDone; if blue cannot answer, RollbackFailed."""


@dataclass(frozen=True)
class UnloadGreen(Action):
    """Drop the green slot's session (a no-op when nothing is loaded)."""


@dataclass(frozen=True)
class DeleteGreenFiles(Action):
    """Delete everything in the green area, partial downloads included (a no-op when empty)."""


@dataclass(frozen=True)
class CommitGreen(Action):
    """Make the green bundle the blue one on disk (write, fsync, rename), point the blue slot at
    it, then unload and delete the old blue. A no-op when already done."""


@dataclass(frozen=True)
class RecordEvent(Action):
    """Append ``kind`` with ``detail`` to the event log (and the outbox for the hub)."""

    kind: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportAck(Action):
    """Answer command ``command_id`` on the ack topic."""

    command_id: str
    status: Literal["ok", "refused"]
    reason: str


def as_json(obj: Event | Action) -> dict[str, Any]:
    """An event or action as a JSON-ready dict, its class name under ``"type"``."""
    out: dict[str, Any] = {"type": type(obj).__name__}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = dict(value) if isinstance(value, Mapping) else value
    return out


# ---------------------------------------------------------------------------------------------
# Policy and the evidence the health gates read


@dataclass(frozen=True)
class SwapPolicy:
    """Thresholds of the local health gates, the crash-loop counter and the loop guard.

    The runner reads the same object: it feeds :func:`swap.judge_health` with it and builds it
    from the agent's config.
    """

    #: green trips when errors / requests exceeds this
    max_error_rate: float = 0.05
    #: green trips when it returned more NaN/inf outputs than this
    max_nonfinite: int = 0
    #: green trips when its p99 latency exceeds this multiple of blue's
    max_p99_ratio: float = 2.0
    #: below this many green requests every gate is "not enough evidence" (never trips)
    min_requests_for_gates: int = 50
    #: the start after a promotion that reaches this count boots blue instead (crash loop)
    max_starts_before_rollback: int = 3
    #: automatic rollbacks allowed within the window; then stages need force
    max_rollbacks: int = 3
    rollback_window_seconds: float = 3600.0

    DEFAULT: ClassVar[SwapPolicy]

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, float, bool], ...] = (
            ("max_error_rate", self.max_error_rate, 0.0 <= self.max_error_rate <= 1.0),
            ("max_nonfinite", self.max_nonfinite, self.max_nonfinite >= 0),
            ("max_p99_ratio", self.max_p99_ratio, 1.0 <= self.max_p99_ratio < math.inf),
            ("min_requests_for_gates", self.min_requests_for_gates,
             self.min_requests_for_gates >= 1),
            ("max_starts_before_rollback", self.max_starts_before_rollback,
             1 <= self.max_starts_before_rollback <= 100),
            ("max_rollbacks", self.max_rollbacks, 1 <= self.max_rollbacks <= 100),
            ("rollback_window_seconds", self.rollback_window_seconds,
             0.0 < self.rollback_window_seconds < math.inf),
        )
        for name, value, ok in checks:
            if not ok:
                raise SwapError(
                    f"swap policy {name} = {value!r} is out of range; defaults: "
                    f"{dataclasses.asdict(SwapPolicy.DEFAULT)}"
                )


SwapPolicy.DEFAULT = SwapPolicy()


@dataclass(frozen=True)
class HealthStats:
    """What one slot did over the judged window (counted by the runner)."""

    requests: int
    errors: int = 0
    nonfinite_outputs: int = 0
    p99_us: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.errors <= self.requests or self.nonfinite_outputs < 0:
            raise SwapError(
                f"health stats {self!r}: expected 0 <= errors <= requests and "
                "nonfinite_outputs >= 0"
            )
        if not (0.0 <= self.p99_us < math.inf):
            raise SwapError(f"health stats p99_us {self.p99_us!r} is not a finite number >= 0")


# ---------------------------------------------------------------------------------------------
# The refusals: every (phase, event type) pair that swap.TRANSITIONS does not handle, with why.
# A test checks that the two tables are disjoint and together cover every pair.

P = SwapPhase
_BUSY = "a rollout is in progress; commit it or roll it back first"
_NOTHING = "nothing is staged"
_UNTESTED = "green has not passed its test vectors yet"
_DONE = "the rollout is committed; stage a new bundle first"
_UNDER_WAY = "a rollback is under way"
_GONE = "green was rolled back and removed; stage again first"
_FAILED = "green failed staging and is never offered traffic; stage again first"
_NO_DOWNLOAD = "no download or verification is in progress"
_NO_GREEN = "no green is loaded"
_NOT_JUDGED = "green neither shadows nor serves, so no gate judges it"
_NO_ROLLBACK = "no rollback is under way"

_REFUSALS: dict[type[Event], dict[SwapPhase, str]] = {
    Stage: {P.STAGING: _BUSY, P.STAGED: _BUSY, P.SHADOW: _BUSY, P.PROMOTED: _BUSY},
    Shadow: {
        P.IDLE: _NOTHING, P.STAGING: _UNTESTED, P.SHADOW: "green is already in shadow",
        P.PROMOTED: "green already serves; shadow comes before promote", P.COMMITTED: _DONE,
        P.ROLLING_BACK: _UNDER_WAY, P.ROLLED_BACK: _GONE, P.FAILED: _FAILED,
    },
    Promote: {
        P.IDLE: _NOTHING, P.STAGING: _UNTESTED, P.PROMOTED: "green already serves",
        P.COMMITTED: _DONE, P.ROLLING_BACK: _UNDER_WAY, P.ROLLED_BACK: _GONE,
        P.FAILED: _FAILED,
    },
    Commit: {
        P.IDLE: _NOTHING, P.STAGING: "only a promoted green is committed; promote first",
        P.STAGED: "only a promoted green is committed; promote first",
        P.SHADOW: "only a promoted green is committed; promote first",
        P.COMMITTED: "already committed", P.ROLLING_BACK: _UNDER_WAY, P.ROLLED_BACK: _GONE,
        P.FAILED: _FAILED,
    },
    Rollback: {
        P.IDLE: "no rollout has happened; there is nothing to roll back",
        P.COMMITTED: "a commit is final: the previous model is deleted; stage it again "
                     "(with force, since it is older)",
    },
    StageVerified: {p: _NO_DOWNLOAD for p in P if p is not P.STAGING},
    StageFailed: {p: _NO_DOWNLOAD for p in P if p is not P.STAGING},
    GreenTestVectorsPassed: {
        P.IDLE: _NO_GREEN, P.COMMITTED: _NO_GREEN, P.ROLLING_BACK: _UNDER_WAY,
        P.ROLLED_BACK: _NO_GREEN, P.FAILED: _NO_GREEN,
    },
    GreenTestVectorsFailed: {
        P.IDLE: _NO_GREEN, P.COMMITTED: _NO_GREEN, P.ROLLING_BACK: _UNDER_WAY,
        P.ROLLED_BACK: _NO_GREEN, P.FAILED: _NO_GREEN,
    },
    HealthGateTripped: {
        P.IDLE: _NOT_JUDGED, P.STAGING: _NOT_JUDGED, P.STAGED: _NOT_JUDGED,
        P.COMMITTED: "a commit is final: no automatic rollback after it",
        P.ROLLING_BACK: _UNDER_WAY, P.ROLLED_BACK: _NOT_JUDGED, P.FAILED: _NOT_JUDGED,
    },
    RollbackDone: {p: _NO_ROLLBACK for p in P if p is not P.ROLLING_BACK},
    RollbackFailed: {p: _NO_ROLLBACK for p in P if p is not P.ROLLING_BACK},
    AgentStarted: {},
}

#: (phase, event type) → why that event is refused in that phase
REFUSED: dict[tuple[SwapPhase, type[Event]], str] = {
    (phase, event): reason
    for event, reasons in _REFUSALS.items()
    for phase, reason in reasons.items()
}


# ---------------------------------------------------------------------------------------------
# The local health gates


def judge_health(policy: SwapPolicy, green: HealthStats, blue: HealthStats | None, *,
                 cycle: int) -> HealthGateTripped | None:
    """The first local gate green fails over its window, or None (passing or too little evidence).

    Fewer than ``min_requests_for_gates`` green requests never trips a gate. The p99 gate also
    needs blue's evidence (blue's last window before the promotion, or its shadow window);
    without enough of it that gate is inconclusive. Checked in order: non-finite outputs,
    error rate, p99 ratio. ``cycle`` is the rollout the evidence belongs to.
    """
    n = green.requests
    if n < policy.min_requests_for_gates:
        return None
    if green.nonfinite_outputs > policy.max_nonfinite:
        return HealthGateTripped(
            cycle=cycle, gate="nonfinite",
            numbers={"requests": n, "nonfinite_outputs": green.nonfinite_outputs,
                     "max_nonfinite": policy.max_nonfinite},
            reason=f"{green.nonfinite_outputs} NaN/inf outputs in {n} requests "
                   f"(at most {policy.max_nonfinite} allowed)")
    rate = green.errors / n
    if rate > policy.max_error_rate:
        return HealthGateTripped(
            cycle=cycle, gate="error_rate",
            numbers={"requests": n, "errors": green.errors, "error_rate": rate,
                     "max_error_rate": policy.max_error_rate},
            reason=f"error rate {rate:.4f} ({green.errors}/{n}) > {policy.max_error_rate}")
    if blue is not None and blue.requests >= policy.min_requests_for_gates:
        ratio = green.p99_us / max(blue.p99_us, 1.0)  # 1 µs floor: never divide by zero
        if ratio > policy.max_p99_ratio:
            return HealthGateTripped(
                cycle=cycle, gate="p99_latency",
                numbers={"requests": n, "green_p99_us": green.p99_us,
                         "blue_p99_us": blue.p99_us, "p99_ratio": ratio,
                         "max_p99_ratio": policy.max_p99_ratio},
                reason=f"p99 {green.p99_us:g} µs is {ratio:.2f}x blue's {blue.p99_us:g} µs "
                       f"(> {policy.max_p99_ratio}x)")
    return None

"""The blue-green swap on the device: a pure state machine over an explicit transition table.

Two slots: ``blue`` serves, ``green`` is the candidate. One rollout of one bundle is a *cycle*
(numbered from 1); every phase but ``idle`` belongs to the current cycle::

  resting phases: blue serves, nothing else is loaded; each one accepts Stage (a new cycle)
    idle ──┐  committed ──┐  rolled_back ──┐  failed ──┐
           └──────────────┴────────────────┴───────────┴──Stage──▶ staging
                                                                      │ StageFailed,
    staging ──StageVerified──▶ staging (green on disk, verified)      │ GreenTestVectorsFailed
    staging ──GreenTestVectorsPassed──▶ staged                        ▼
    staged ──Shadow──▶ shadow                                       failed
    staged, shadow ──Promote──▶ promoted ──Commit──▶ committed

    staging, staged, shadow, promoted ──Rollback (operator)────────┐
    staged, shadow, promoted ──GreenTestVectorsFailed (auto)───────┤
    shadow, promoted ──HealthGateTripped (auto)────────────────────┼──▶ rolling_back
    promoted ──AgentStarted, the max-th start (crash loop, auto)───┘        │ RollbackDone
                                                                            ▼
                                                                       rolled_back

Why each phase exists:

- ``idle``: the first boot, before any stage (cycle 0). Nothing returns to it: a new Stage
  leaves committed, rolled_back or failed directly for staging, so the retained state keeps
  saying how the last cycle ended until the next one begins.
- ``staging``: a download, verification, load and test-vector replay in progress; a restart
  repeats the step it was in (the download resumes; a verified green is loaded again).
- ``staged``: green loaded beside blue and its test vectors passed; only now can it be promoted.
- ``shadow``: green also sees live traffic; blue still answers.
- ``promoted``: green answers, blue stays loaded; the crash-loop start counter runs here.
- ``committed``: green became blue (the old blue is deleted). Final for its cycle: Rollback is
  refused, because the model it would restore is gone — stage it again (with force when older).
- ``rolling_back``: the swap to blue was ordered but not yet confirmed; a restart orders it
  again. The runner answers RollbackDone, or RollbackFailed (stays; retried by the next start
  or a new Rollback command). If blue can never answer again, a forced Stage replaces the
  rollback, so even this phase has a way out.
- ``rolled_back``: blue answers again and green is gone (after a rollback).
- ``failed``: staging failed; green was never offered traffic and its files are deleted.
  Kept apart from rolled_back because nothing was ever installed: the hub reads a failed stage
  (bad bundle, bad download) differently from a model that misbehaved.

Rules the table does not show:

- Idempotency: a command whose id is in the state's last :data:`RECENT_COMMANDS` answers is a
  ``duplicate``: the state does not change and the original ack is sent again. A refused
  command is remembered too (a resent id gets the same refusal); nothing else changes.
- Outcomes name their cycle; one from another cycle is refused as stale, changing nothing.
- Downgrades: a Stage whose version (claimed, then again the verified manifest's) is older than
  ``committed_version`` in SemVer precedence is refused unless ``force``. Equal is allowed.
- Rollback in rolling_back, rolled_back or failed succeeds without changing anything (the state
  it asks for holds or is under way; in rolling_back its actions are issued again, a retry).
- Crash loop: every AgentStarted in promoted counts (clean restarts too — there is no telling
  them apart before the commit); the start that reaches ``max_starts_before_rollback`` rolls
  back instead of loading green. So N deaths after a promotion boot blue.
- Loop guard: automatic rollbacks (test vectors failing after staged, health gates, crash loop;
  not operator Rollbacks, not failed stages) are timestamped. While ``max_rollbacks`` or more of
  them lie within the last ``rollback_window_seconds``, every Stage without ``force`` is
  refused, so at most ``max_rollbacks`` automatic rollbacks happen in any window. A forced Stage
  clears the history. Timestamps are wall-clock (they must survive reboots): a Raspberry Pi has
  no real-time clock and may boot in the past, so a timestamp "in the future" counts as recent.

The table is data: :data:`TRANSITIONS` maps (phase, event type) to an :class:`Edge` (the phases
its handler may reach, and the handler); ``swap_events.REFUSED`` gives every other pair with the
reason it is refused. A test checks that the two partition all pairs and that every phase
reaches both committed and rolled_back.

The runner owns the clock, SQLite and onnxruntime. For each event it calls :func:`transition`,
persists ``decision.state`` when it changed (before anything else), then carries out
``decision.actions`` in order. At start it feeds :class:`AgentStarted` and persists before
loading green, so a green that crashes the process is counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from edge_agent.swap_events import (
    EVENT_TYPES,
    REFUSED,
    Action,
    AgentStarted,
    Command,
    Commit,
    CommitGreen,
    DeleteGreenFiles,
    DownloadAndVerify,
    Event,
    GreenTestVectorsFailed,
    GreenTestVectorsPassed,
    HealthGateTripped,
    LoadGreen,
    Outcome,
    Promote,
    RecordEvent,
    ReportAck,
    Rollback,
    RollbackDone,
    RollbackFailed,
    Shadow,
    Stage,
    StageFailed,
    StageVerified,
    StartShadow,
    StopShadow,
    SwapError,
    SwapPhase,
    SwapPolicy,
    SwapToBlue,
    SwapToGreen,
    UnloadGreen,
    check_numbers,
    check_sha256,
    is_older,
    judge_health,
)
from fleet_protocol.errors import ManifestError
from fleet_protocol.manifest import parse_semver

__all__ = [
    "RECENT_COMMANDS",
    "REFUSED",
    "RESTING",
    "SCHEMA_VERSION",
    "TRANSITIONS",
    "CommandRecord",
    "Decision",
    "Edge",
    "SwapState",
    "is_older",
    "judge_health",
    "resume_actions",
    "transition",
]

SCHEMA_VERSION = 1
#: answered command ids remembered for idempotency (oldest forgotten first)
RECENT_COMMANDS = 256
#: automatic rollback timestamps kept at most (they are also pruned to the window)
MAX_ROLLBACK_TIMES = 256

P = SwapPhase
RESTING = frozenset({P.IDLE, P.COMMITTED, P.ROLLED_BACK, P.FAILED})
_GREEN_HELD = frozenset({P.STAGED, P.SHADOW, P.PROMOTED})
_IN_ROLLOUT = frozenset({P.STAGING, P.STAGED, P.SHADOW, P.PROMOTED})


@dataclass(frozen=True)
class CommandRecord:
    """The answer given to one command id."""

    id: str
    status: Literal["ok", "refused"]
    reason: str


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "cycle": (int,),
    "blue_version": (str, type(None)),
    "blue_sha256": (str, type(None)),
    "committed_version": (str, type(None)),
    "green_version": (str, type(None)),
    "green_sha256": (str, type(None)),
    "green_path": (str, type(None)),
    "stage_source": (str, type(None)),
    "stage_version": (str, type(None)),
    "stage_force": (bool,),
    "start_count_since_promotion": (int,),
    "promoted_at": (float, int, type(None)),
    "rollback_count": (int,),
    "last_reason": (str,),
    "updated_at": (float, int),
}


@dataclass(frozen=True)
class SwapState:
    """Everything the swap must remember across restarts; persisted before each transition.

    Construct the first one with :meth:`initial`; every other one comes from :func:`transition`
    or :meth:`from_dict`. The constructor checks the invariants, so an inconsistent state
    (e.g. promoted without a green) cannot exist.
    """

    phase: SwapPhase = P.IDLE
    cycle: int = 0
    blue_version: str | None = None
    blue_sha256: str | None = None
    #: the downgrade floor: the version of the last commit (or of the installed blue)
    committed_version: str | None = None
    green_version: str | None = None
    green_sha256: str | None = None
    green_path: str | None = None
    #: what the current cycle's Stage asked for (kept to resume and to re-check once verified)
    stage_source: str | None = None
    stage_version: str | None = None
    stage_force: bool = False
    start_count_since_promotion: int = 0
    promoted_at: float | None = None
    recent_commands: tuple[CommandRecord, ...] = ()
    #: wall-clock times of automatic rollbacks within the loop guard's window
    auto_rollback_times: tuple[float, ...] = ()
    #: rollbacks of any kind since the state was created
    rollback_count: int = 0
    #: why the last phase change happened, and its numbers (gates, counters)
    last_reason: str = ""
    last_numbers: Mapping[str, float] = field(default_factory=dict)
    updated_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def initial(
        cls, *, blue_version: str | None = None, blue_sha256: str | None = None, now: float = 0.0
    ) -> SwapState:
        """The state of a device that has never staged; the installed blue is the floor."""
        return cls(blue_version=blue_version, blue_sha256=blue_sha256,
                   committed_version=blue_version, last_reason="installed", updated_at=now)

    def __post_init__(self) -> None:
        def bad(message: str) -> SwapError:
            return SwapError(f"swap state is inconsistent: {message}")

        if self.schema_version != SCHEMA_VERSION:
            raise SwapError(f"swap state schema_version {self.schema_version!r} is not "
                            f"{SCHEMA_VERSION}, the one this agent reads")
        if not isinstance(self.phase, SwapPhase):
            raise bad(f"phase {self.phase!r} is not a SwapPhase")
        for name, types in _STATE_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise bad(f"{name} = {value!r} is not a {' or '.join(t.__name__ for t in types)}")
        for name in ("cycle", "start_count_since_promotion", "rollback_count"):
            if getattr(self, name) < 0:
                raise bad(f"{name} = {getattr(self, name)!r} is negative")
        for name in ("updated_at", "promoted_at"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise bad(f"{name} = {value!r} is not finite")
        for name in ("blue_version", "committed_version", "green_version", "stage_version"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_semver(value)
                except ManifestError as err:
                    raise bad(f"{name}: {err}") from err
        for name in ("blue_sha256", "green_sha256"):
            if getattr(self, name) is not None:
                check_sha256(name, getattr(self, name))
        check_numbers("last_numbers", self.last_numbers)
        if (self.blue_version is None) != (self.blue_sha256 is None):
            raise bad("blue_version and blue_sha256 must be set together")
        green = (self.green_version, self.green_sha256, self.green_path)
        if any(g is None for g in green) and any(g is not None for g in green):
            raise bad(f"green version, sha256 and path must be set together, got {green}")
        ph = self.phase
        if (ph is P.IDLE) != (self.cycle == 0):
            raise bad(f"phase {ph.value} with cycle {self.cycle} (cycle 0 is exactly idle)")
        if ph in _GREEN_HELD and self.green_sha256 is None:
            raise bad(f"phase {ph.value} without a green bundle")
        if ph in RESTING and (self.green_sha256 is not None or self.stage_source is not None):
            raise bad(f"resting phase {ph.value} still names a green or a stage source")
        if ph in _IN_ROLLOUT and self.stage_source is None:
            raise bad(f"phase {ph.value} without a stage source")
        if (ph is P.PROMOTED) != (self.promoted_at is not None):
            raise bad(f"phase {ph.value} with promoted_at {self.promoted_at!r}")
        if ph is not P.PROMOTED and self.start_count_since_promotion:
            raise bad(f"start count {self.start_count_since_promotion} outside promoted")
        if len(self.recent_commands) > RECENT_COMMANDS or len(
            {r.id for r in self.recent_commands}
        ) != len(self.recent_commands):
            raise bad(f"recent_commands holds more than {RECENT_COMMANDS} or repeated ids")
        if len(self.auto_rollback_times) > MAX_ROLLBACK_TIMES or not all(
            isinstance(t, float | int) and math.isfinite(t) for t in self.auto_rollback_times
        ):
            raise bad(f"auto_rollback_times {self.auto_rollback_times!r}")

    def answer_to(self, command_id: str) -> CommandRecord | None:
        """The answer already given to ``command_id``, if it is still remembered."""
        return next((r for r in self.recent_commands if r.id == command_id), None)

    def recent_auto_rollbacks(self, now: float, policy: SwapPolicy) -> tuple[float, ...]:
        """Automatic rollback times inside the loop guard's window ending at ``now``."""
        return tuple(t for t in self.auto_rollback_times
                     if now - t < policy.rollback_window_seconds)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back equal."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["phase"] = self.phase.value
        out["recent_commands"] = [dataclasses.asdict(r) for r in self.recent_commands]
        out["auto_rollback_times"] = list(self.auto_rollback_times)
        out["last_numbers"] = dict(self.last_numbers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwapState:
        """Read a persisted state; an unknown schema version or a bad field is a SwapError."""
        if not isinstance(data, Mapping):
            raise SwapError(f"swap state {data!r} is not a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SwapError(
                f"swap state schema_version {version!r} is not {SCHEMA_VERSION}, the one this "
                "agent reads; run the agent version that wrote it, or migrate the state"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise SwapError(f"swap state fields: missing {sorted(names - set(data))}, "
                            f"unknown {sorted(set(data) - names)}")
        try:
            fields = dict(data)
            fields["phase"] = SwapPhase(data["phase"])
            records = []
            for r in data["recent_commands"]:
                if (set(r) != {"id", "status", "reason"} or r["status"] not in ("ok", "refused")
                        or not isinstance(r["id"], str) or not isinstance(r["reason"], str)):
                    raise SwapError(f"swap state command record {r!r} is malformed")
                records.append(CommandRecord(r["id"], r["status"], r["reason"]))
            fields["recent_commands"] = tuple(records)
            fields["auto_rollback_times"] = tuple(data["auto_rollback_times"])
            fields["last_numbers"] = dict(data["last_numbers"])
        except (TypeError, ValueError, KeyError) as err:
            raise SwapError(f"swap state is malformed: {err}") from err
        return cls(**fields)


@dataclass(frozen=True)
class Decision:
    """What :func:`transition` decided: the state to persist, then the actions to carry out."""

    state: SwapState
    actions: tuple[Action, ...]
    outcome: Literal["applied", "duplicate", "refused"]
    reason: str


Handler = Callable[[SwapState, Any, float, SwapPolicy], Decision]


@dataclass(frozen=True)
class Edge:
    """One entry of :data:`TRANSITIONS`: the phases its handler may lead to, and the handler."""

    targets: frozenset[SwapPhase]
    handler: Handler


# --- handlers --------------------------------------------------------------------------------

_ROLLBACK_ACTIONS: tuple[Action, ...] = (StopShadow(), SwapToBlue(), UnloadGreen(),
                                         DeleteGreenFiles())


def resume_actions(state: SwapState) -> tuple[Action, ...]:
    """What a restart must redo to bring the device back to what ``state`` says (idempotent)."""
    ph = state.phase
    if ph is P.STAGING:
        if state.green_path is None:
            assert state.stage_source is not None
            return (DownloadAndVerify(state.cycle, state.stage_source),)
        return (LoadGreen(state.cycle, state.green_path),)
    if ph in _GREEN_HELD:
        assert state.green_path is not None
        load = LoadGreen(state.cycle, state.green_path)
        then = {P.STAGED: (), P.SHADOW: (StartShadow(),), P.PROMOTED: (SwapToGreen(),)}[ph]
        return (load, *then)
    if ph is P.COMMITTED:
        return (CommitGreen(),)
    if ph is P.ROLLING_BACK:
        return _ROLLBACK_ACTIONS
    if ph in (P.ROLLED_BACK, P.FAILED):
        return (DeleteGreenFiles(),)
    return ()


def _applied(state: SwapState, reason: str, *actions: Action) -> Decision:
    return Decision(state, actions, "applied", reason)


def _refused(state: SwapState, reason: str) -> Decision:
    return Decision(state, (), "refused", reason)


def _moved(state: SwapState, phase: SwapPhase, now: float, reason: str,
           numbers: Mapping[str, float] | None = None, **changes: Any) -> SwapState:
    return replace(state, phase=phase, updated_at=now, last_reason=reason,
                   last_numbers=dict(numbers or {}), **changes)


_NO_GREEN: dict[str, Any] = {"green_version": None, "green_sha256": None, "green_path": None,
                             "stage_source": None, "stage_version": None, "stage_force": False}


def _record(kind: str, state: SwapState, **detail: Any) -> RecordEvent:
    return RecordEvent(kind, {"cycle": state.cycle, "phase": state.phase.value, **detail})


def _stage(state: SwapState, ev: Stage, now: float, policy: SwapPolicy) -> Decision:
    if state.phase is P.ROLLING_BACK and not ev.force:
        return _refused(state, f"the rollback of cycle {state.cycle} is not confirmed yet; "
                        "wait, send Rollback to retry it, or stage with force")
    overrides = []
    floor = state.committed_version
    if ev.version is not None:
        try:
            older = is_older(ev.version, floor)
        except ManifestError as err:
            return _refused(state, str(err))
        if older and not ev.force:
            return _refused(state, f"downgrade refused: {ev.version} is older than the "
                            f"committed {floor}; stage with force to allow it")
        if older:
            overrides.append(f"downgrade below committed {floor}")
    recent = state.recent_auto_rollbacks(now, policy)
    if len(recent) >= policy.max_rollbacks:
        if not ev.force:
            return _refused(state, f"rollback-loop guard: {len(recent)} automatic rollbacks in "
                            f"the last {policy.rollback_window_seconds:g} s (limit "
                            f"{policy.max_rollbacks}); an operator must stage with force")
        overrides.append(f"loop guard reset after {len(recent)} automatic rollbacks")
        recent = ()
    cycle = state.cycle + 1
    forced = f" (forced: {'; '.join(overrides)})" if overrides else ""
    reason = f"staging {ev.source} as cycle {cycle}{forced}"
    new = _moved(state, P.STAGING, now, reason, None, **{
        **_NO_GREEN, "cycle": cycle, "stage_source": ev.source, "stage_version": ev.version,
        "stage_force": ev.force, "auto_rollback_times": recent})
    first: tuple[Action, ...] = (StopShadow(),) if state.phase is P.ROLLING_BACK else ()
    return _applied(new, reason, *first, DeleteGreenFiles(), DownloadAndVerify(cycle, ev.source),
                    _record("stage", new, source=ev.source, version=ev.version,
                            overrides=overrides, replaced_phase=state.phase.value))


def _fail(state: SwapState, now: float, reason: str) -> Decision:
    new = _moved(state, P.FAILED, now, reason, None, **_NO_GREEN)
    return _applied(new, reason, UnloadGreen(), DeleteGreenFiles(),
                    _record("stage_failed", new, reason=reason, version=state.green_version))


def _stage_verified(state: SwapState, ev: StageVerified, now: float, policy: SwapPolicy
                    ) -> Decision:
    got = (ev.version, ev.sha256, ev.path)
    if state.green_sha256 is not None:
        held = (state.green_version, state.green_sha256, state.green_path)
        if got == held:
            return _applied(state, "already verified")
        return _fail(state, now, f"a second verification disagrees: {got} after {held}")
    if state.stage_version is not None and ev.version != state.stage_version:
        return _fail(state, now, f"the signed manifest says version {ev.version}, the command "
                     f"said {state.stage_version}")
    floor = state.committed_version
    try:
        older = is_older(ev.version, floor)
    except ManifestError as err:
        return _fail(state, now, str(err))
    if older and not state.stage_force:
        return _fail(state, now, f"downgrade refused: the verified bundle is {ev.version}, "
                     f"older than the committed {floor}")
    reason = f"verified {ev.version} ({ev.sha256[:12]}); loading green"
    new = replace(state, green_version=ev.version, green_sha256=ev.sha256, green_path=ev.path,
                  updated_at=now, last_reason=reason)
    return _applied(new, reason, LoadGreen(state.cycle, ev.path),
                    _record("stage_verified", new, version=ev.version, sha256=ev.sha256))


def _stage_failed(state: SwapState, ev: StageFailed, now: float, policy: SwapPolicy) -> Decision:
    return _fail(state, now, f"staging failed: {ev.reason}")


def _vectors_passed(state: SwapState, ev: GreenTestVectorsPassed, now: float,
                    policy: SwapPolicy) -> Decision:
    if state.phase is not P.STAGING:
        return _applied(state, "green passed its test vectors again after a restart")
    if state.green_sha256 is None:
        return _refused(state, "green is not verified yet: test vectors cannot have run")
    reason = f"green {state.green_version} passed its test vectors"
    new = _moved(state, P.STAGED, now, reason)
    return _applied(new, reason, _record("staged", new, version=state.green_version))


def _begin_rollback(state: SwapState, now: float, policy: SwapPolicy, trigger: str,
                    reason: str, numbers: Mapping[str, float] | None = None) -> Decision:
    automatic = trigger != "operator"
    times = state.recent_auto_rollbacks(now, policy) + ((now,) if automatic else ())
    new = _moved(state, P.ROLLING_BACK, now, reason, numbers, start_count_since_promotion=0,
                 promoted_at=None, rollback_count=state.rollback_count + 1,
                 auto_rollback_times=times[-MAX_ROLLBACK_TIMES:])
    return _applied(new, reason, *_ROLLBACK_ACTIONS, _record(
        "rollback", new, trigger=trigger, automatic=automatic, reason=reason,
        numbers=dict(numbers or {}), left_phase=state.phase.value, version=state.green_version))


def _vectors_failed(state: SwapState, ev: GreenTestVectorsFailed, now: float,
                    policy: SwapPolicy) -> Decision:
    if state.phase is P.STAGING:
        return _fail(state, now, f"green failed its test vectors: {ev.reason}")
    return _begin_rollback(state, now, policy, "test_vectors",
                           f"green failed its test vectors on reload: {ev.reason}")


def _health(state: SwapState, ev: HealthGateTripped, now: float, policy: SwapPolicy) -> Decision:
    return _begin_rollback(state, now, policy, "health_gate",
                           f"health gate {ev.gate} tripped: {ev.reason}", ev.numbers)


def _rollback(state: SwapState, ev: Rollback, now: float, policy: SwapPolicy) -> Decision:
    if state.phase is P.ROLLING_BACK:
        return _applied(state, "rollback already under way; its actions are issued again",
                        *_ROLLBACK_ACTIONS)
    if state.phase in (P.ROLLED_BACK, P.FAILED):
        return _applied(state, f"blue already serves (cycle {state.cycle} {state.phase.value})")
    return _begin_rollback(state, now, policy, "operator", f"operator rollback: {ev.reason}")


def _rollback_done(state: SwapState, ev: RollbackDone, now: float, policy: SwapPolicy
                   ) -> Decision:
    reason = f"blue {state.blue_version} serves again; green {state.green_version} removed"
    new = _moved(state, P.ROLLED_BACK, now, reason, state.last_numbers, **_NO_GREEN)
    return _applied(new, reason, _record("rolled_back", new, cause=state.last_reason))


def _rollback_failed(state: SwapState, ev: RollbackFailed, now: float, policy: SwapPolicy
                     ) -> Decision:
    reason = f"rollback failed, blue does not answer: {ev.reason}"
    new = replace(state, updated_at=now, last_reason=reason)
    return _applied(new, reason, _record("rollback_failed", new, reason=ev.reason))


def _shadow(state: SwapState, ev: Shadow, now: float, policy: SwapPolicy) -> Decision:
    new = _moved(state, P.SHADOW, now, f"shadowing green {state.green_version}")
    return _applied(new, new.last_reason, StartShadow(), _record("shadow", new))


def _promote(state: SwapState, ev: Promote, now: float, policy: SwapPolicy) -> Decision:
    new = _moved(state, P.PROMOTED, now, f"green {state.green_version} serves; blue "
                 f"{state.blue_version} stays loaded", promoted_at=now)
    stop: tuple[Action, ...] = (StopShadow(),) if state.phase is P.SHADOW else ()
    return _applied(new, new.last_reason, *stop, SwapToGreen(), _record("promote", new))


def _commit(state: SwapState, ev: Commit, now: float, policy: SwapPolicy) -> Decision:
    reason = f"committed {state.green_version}, replacing {state.blue_version}"
    new = _moved(state, P.COMMITTED, now, reason, None, **{
        **_NO_GREEN, "blue_version": state.green_version, "blue_sha256": state.green_sha256,
        "committed_version": state.green_version, "promoted_at": None,
        "start_count_since_promotion": 0})
    return _applied(new, reason, CommitGreen(),
                    _record("commit", new, version=new.blue_version, replaced=state.blue_version))


def _started(state: SwapState, ev: AgentStarted, now: float, policy: SwapPolicy) -> Decision:
    if state.phase is not P.PROMOTED:
        return _applied(state, f"resuming {state.phase.value}", *resume_actions(state))
    starts = state.start_count_since_promotion + 1
    if starts >= policy.max_starts_before_rollback:
        return _begin_rollback(
            state, now, policy, "crash_loop",
            f"crash loop: start {starts} since the promotion without a commit (limit "
            f"{policy.max_starts_before_rollback}); booting blue",
            {"starts": starts, "max_starts_before_rollback": policy.max_starts_before_rollback,
             "seconds_since_promotion": now - (state.promoted_at or now)})
    new = replace(state, start_count_since_promotion=starts, updated_at=now)
    return _applied(new, f"start {starts} since the promotion (rollback at "
                    f"{policy.max_starts_before_rollback})", *resume_actions(new))


# --- the table -------------------------------------------------------------------------------


def _edges(handler: Handler, targets: Mapping[SwapPhase, frozenset[SwapPhase]]
           ) -> dict[SwapPhase, Edge]:
    return {phase: Edge(to, handler) for phase, to in targets.items()}


def _to(*phases: SwapPhase) -> frozenset[SwapPhase]:
    return frozenset(phases)


#: (phase, event type) → Edge. Every pair not here is in REFUSED, with its reason.
TRANSITIONS: dict[tuple[SwapPhase, type[Event]], Edge] = {
    (phase, event): edge
    for event, edges in {
        Stage: _edges(_stage, {p: _to(p, P.STAGING) for p in (*RESTING, P.ROLLING_BACK)}),
        Shadow: _edges(_shadow, {P.STAGED: _to(P.SHADOW)}),
        Promote: _edges(_promote, {P.STAGED: _to(P.PROMOTED), P.SHADOW: _to(P.PROMOTED)}),
        Commit: _edges(_commit, {P.PROMOTED: _to(P.COMMITTED)}),
        Rollback: _edges(_rollback, {
            **{p: _to(P.ROLLING_BACK) for p in _IN_ROLLOUT},
            **{p: _to(p) for p in (P.ROLLING_BACK, P.ROLLED_BACK, P.FAILED)}}),
        StageVerified: _edges(_stage_verified, {P.STAGING: _to(P.STAGING, P.FAILED)}),
        StageFailed: _edges(_stage_failed, {P.STAGING: _to(P.FAILED)}),
        GreenTestVectorsPassed: _edges(_vectors_passed, {
            P.STAGING: _to(P.STAGING, P.STAGED), **{p: _to(p) for p in _GREEN_HELD}}),
        GreenTestVectorsFailed: _edges(_vectors_failed, {
            P.STAGING: _to(P.FAILED), **{p: _to(P.ROLLING_BACK) for p in _GREEN_HELD}}),
        HealthGateTripped: _edges(_health, {p: _to(P.ROLLING_BACK)
                                            for p in (P.SHADOW, P.PROMOTED)}),
        RollbackDone: _edges(_rollback_done, {P.ROLLING_BACK: _to(P.ROLLED_BACK)}),
        RollbackFailed: _edges(_rollback_failed, {P.ROLLING_BACK: _to(P.ROLLING_BACK)}),
        AgentStarted: _edges(_started, {
            p: _to(p, P.ROLLING_BACK) if p is P.PROMOTED else _to(p) for p in SwapPhase}),
    }.items()
    for phase, edge in edges.items()
}


def transition(state: SwapState, event: Event, now: float,
               policy: SwapPolicy = SwapPolicy.DEFAULT) -> Decision:
    """Decide what ``event`` does to ``state`` at wall-clock ``now``; pure, never does I/O.

    Raises :class:`SwapError` only on programming errors (an unknown event type, a non-finite
    ``now``, a table that lets a handler reach a phase it does not declare).
    """
    if type(event) not in EVENT_TYPES:
        raise SwapError(f"{event!r} is not a swap event; expected one of "
                        f"{[t.__name__ for t in EVENT_TYPES]}")
    if not math.isfinite(now):
        raise SwapError(f"now = {now!r} is not a finite time")
    name = type(event).__name__
    if isinstance(event, Command):
        seen = state.answer_to(event.id)
        if seen is not None:
            return Decision(state, (ReportAck(seen.id, seen.status, seen.reason),), "duplicate",
                            f"command {event.id!r} was already answered: {seen.status}: "
                            f"{seen.reason}")
    if isinstance(event, Outcome) and event.cycle != state.cycle:
        decision = _refused(state, f"stale {name}: it reports cycle {event.cycle}, the current "
                            f"cycle is {state.cycle}")
    elif (edge := TRANSITIONS.get((state.phase, type(event)))) is not None:
        decision = edge.handler(state, event, now, policy)
        if decision.state.phase not in edge.targets:
            raise SwapError(f"{name} in {state.phase.value} reached {decision.state.phase.value},"
                            f" not one of its declared targets {sorted(edge.targets)}")
    else:
        decision = _refused(state, f"{name} in {state.phase.value}: "
                            f"{REFUSED[(state.phase, type(event))]}")
    if not isinstance(event, Command):
        return decision
    status: Literal["ok", "refused"] = "ok" if decision.outcome == "applied" else "refused"
    record = CommandRecord(event.id, status, decision.reason)
    remembered = (*decision.state.recent_commands, record)[-RECENT_COMMANDS:]
    return replace(decision, state=replace(decision.state, recent_commands=remembered,
                                           updated_at=now),
                   actions=(ReportAck(event.id, status, decision.reason), *decision.actions))

"""The blue-green swap state machine: its table, every failure edge, idempotency and persistence."""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import AgentError
from edge_agent.swap import (
    RECENT_COMMANDS,
    REFUSED,
    RESTING,
    SCHEMA_VERSION,
    TRANSITIONS,
    Decision,
    SwapState,
    is_older,
    judge_health,
    resume_actions,
    transition,
)
from edge_agent.swap_events import (
    COMMAND_TYPES,
    EVENT_TYPES,
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
    HealthStats,
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
    as_json,
)

P = SwapPhase
POLICY = SwapPolicy()
BLUE = "a" * 64
GREEN = "b" * 64
OTHER = "c" * 64
SOURCE = "https://hub.example/bundles/vib-1.1.0.edgebundle"
SETTINGS = settings(deadline=None, max_examples=200)
_ids = itertools.count()


def cid() -> str:
    """A command id never used before in this test session."""
    return f"cmd-{next(_ids)}"


def initial() -> SwapState:
    return SwapState.initial(blue_version="1.0.0", blue_sha256=BLUE, now=0.0)


def drive(state: SwapState, *events: Event, now: float = 100.0) -> SwapState:
    """Apply ``events`` one second apart, each of which must be applied."""
    for i, event in enumerate(events):
        decision = transition(state, event, now + i, POLICY)
        assert decision.outcome == "applied", decision.reason
        state = decision.state
    return state


def verified(cycle: int = 1, version: str = "1.1.0", sha: str = GREEN) -> StageVerified:
    return StageVerified(cycle=cycle, version=version, sha256=sha, path=f"/green/{cycle}")


def in_phase(phase: SwapPhase) -> SwapState:
    """A state in ``phase`` reached through the machine itself (cycle 1)."""
    staging = drive(initial(), Stage(cid(), SOURCE, "1.1.0"))
    staged = drive(staging, verified(), GreenTestVectorsPassed(cycle=1))
    promoted = drive(staged, Promote(cid()))
    rolling_back = drive(promoted, Rollback(cid(), "test"))
    return {
        P.IDLE: initial(),
        P.STAGING: staging,
        P.STAGED: staged,
        P.SHADOW: drive(staged, Shadow(cid())),
        P.PROMOTED: promoted,
        P.COMMITTED: drive(promoted, Commit(cid())),
        P.ROLLING_BACK: rolling_back,
        P.ROLLED_BACK: drive(rolling_back, RollbackDone(cycle=1)),
        P.FAILED: drive(staging, StageFailed(cycle=1, reason="disk full")),
    }[phase]


def sample(event_type: type[Event], cycle: int) -> Event:
    """One well-formed event of ``event_type`` for rollout ``cycle``."""
    c = max(cycle, 1)
    return {
        Stage: lambda: Stage(cid(), SOURCE, "1.2.0"),
        Shadow: lambda: Shadow(cid()),
        Promote: lambda: Promote(cid()),
        Commit: lambda: Commit(cid()),
        Rollback: lambda: Rollback(cid(), "operator"),
        StageVerified: lambda: verified(c, "1.2.0"),
        StageFailed: lambda: StageFailed(cycle=c, reason="signature does not verify"),
        GreenTestVectorsPassed: lambda: GreenTestVectorsPassed(cycle=c),
        GreenTestVectorsFailed: lambda: GreenTestVectorsFailed(cycle=c, reason="vector 3"),
        HealthGateTripped: lambda: HealthGateTripped(
            cycle=c, gate="error_rate", numbers={"error_rate": 0.2}, reason="0.2 > 0.05"),
        RollbackDone: lambda: RollbackDone(cycle=c),
        RollbackFailed: lambda: RollbackFailed(cycle=c, reason="blue does not load"),
        AgentStarted: lambda: AgentStarted(),
    }[event_type]()


def kinds(decision: Decision) -> list[str]:
    return [type(a).__name__ for a in decision.actions]


def records(decision: Decision) -> list[RecordEvent]:
    return [a for a in decision.actions if isinstance(a, RecordEvent)]


# --- the happy path --------------------------------------------------------------------------


def test_happy_path_stage_shadow_promote_commit() -> None:
    """Stage, verify, pass the vectors, shadow, promote and commit: green becomes the new blue."""
    s = initial()
    d = transition(s, Stage("c1", SOURCE, "1.1.0"), 10.0)
    assert d.state.phase is P.STAGING and d.state.cycle == 1
    assert d.actions[:3] == (ReportAck("c1", "ok", d.reason), DeleteGreenFiles(),
                             DownloadAndVerify(1, SOURCE))
    d = transition(d.state, verified(), 11.0)
    assert d.state.phase is P.STAGING and d.actions[0] == LoadGreen(1, "/green/1")
    d = transition(d.state, GreenTestVectorsPassed(cycle=1), 12.0)
    assert d.state.phase is P.STAGED
    d = transition(d.state, Shadow("c2"), 13.0)
    assert d.state.phase is P.SHADOW and StartShadow() in d.actions
    d = transition(d.state, Promote("c3"), 14.0)
    assert d.state.phase is P.PROMOTED and d.state.promoted_at == 14.0
    assert kinds(d)[:3] == ["ReportAck", "StopShadow", "SwapToGreen"]
    d = transition(d.state, Commit("c4"), 15.0)
    s = d.state
    assert s.phase is P.COMMITTED and CommitGreen() in d.actions
    assert (s.blue_version, s.blue_sha256, s.committed_version) == ("1.1.0", GREEN, "1.1.0")
    assert (s.green_version, s.green_sha256, s.green_path, s.stage_source) == (None,) * 4
    assert s.updated_at == 15.0 and [r.id for r in s.recent_commands] == ["c1", "c2", "c3", "c4"]


def test_promote_straight_from_staged_skips_shadow() -> None:
    """Shadow is optional: staged promotes directly, without a StopShadow action."""
    d = transition(in_phase(P.STAGED), Promote("p"), 5.0)
    assert d.state.phase is P.PROMOTED and kinds(d)[:2] == ["ReportAck", "SwapToGreen"]


def test_a_new_stage_leaves_every_resting_phase_directly_for_staging() -> None:
    """committed, rolled_back and failed never pass through idle: Stage opens cycle 2 at once."""
    for phase in (P.COMMITTED, P.ROLLED_BACK, P.FAILED):
        d = transition(in_phase(phase), Stage(cid(), SOURCE, "1.2.0"), 500.0)
        assert (d.outcome, d.state.phase, d.state.cycle) == ("applied", P.STAGING, 2)


# --- failure edges while staging -------------------------------------------------------------


def test_stage_failed_leaves_nothing_installed() -> None:
    """A failed download or verification goes to failed and deletes whatever was written."""
    d = transition(in_phase(P.STAGING), StageFailed(cycle=1, reason="sha256 mismatch"), 7.0)
    assert d.state.phase is P.FAILED and d.state.green_sha256 is None
    assert kinds(d) == ["UnloadGreen", "DeleteGreenFiles", "RecordEvent"]
    assert "sha256 mismatch" in d.state.last_reason


def test_green_failing_its_test_vectors_while_staging_is_never_promotable() -> None:
    """Failed test vectors while staging go to failed, and Promote is then refused."""
    s = drive(in_phase(P.STAGING), verified())
    d = transition(s, GreenTestVectorsFailed(cycle=1, reason="vector 2: 0.9 != 0.1"), 8.0)
    assert d.state.phase is P.FAILED and "vector 2" in d.state.last_reason
    d = transition(d.state, Promote("p"), 9.0)
    assert d.outcome == "refused" and "never offered traffic" in d.reason
    assert d.actions == (ReportAck("p", "refused", d.reason),)


def test_verified_version_must_match_the_commanded_version() -> None:
    """A signed manifest whose version differs from the Stage command's fails the stage."""
    d = transition(in_phase(P.STAGING), verified(version="1.3.0"), 8.0)
    assert d.state.phase is P.FAILED and "1.3.0" in d.reason and "1.1.0" in d.reason


def test_a_second_verification_that_disagrees_fails_the_stage() -> None:
    """Re-verification after a restart must find the same bundle; an equal one changes nothing."""
    s = drive(in_phase(P.STAGING), verified())
    same = transition(s, verified(), 9.0)
    assert same.outcome == "applied" and same.state is s and same.actions == ()
    d = transition(s, verified(sha=OTHER), 9.0)
    assert d.state.phase is P.FAILED and "disagrees" in d.reason


def test_test_vectors_cannot_pass_before_verification() -> None:
    """GreenTestVectorsPassed before StageVerified is refused and changes nothing."""
    s = in_phase(P.STAGING)
    d = transition(s, GreenTestVectorsPassed(cycle=1), 9.0)
    assert (d.outcome, d.state) == ("refused", s)


# --- failure edges after staged --------------------------------------------------------------


@pytest.mark.parametrize("phase", [P.STAGED, P.SHADOW, P.PROMOTED])
def test_test_vectors_failing_on_reload_roll_back_automatically(phase: SwapPhase) -> None:
    """A green that fails its vectors after a restart rolls back and counts for the loop guard."""
    d = transition(in_phase(phase), GreenTestVectorsFailed(cycle=1, reason="bad output"), 300.0)
    assert d.state.phase is P.ROLLING_BACK and d.state.auto_rollback_times == (300.0,)
    assert kinds(d)[:4] == ["StopShadow", "SwapToBlue", "UnloadGreen", "DeleteGreenFiles"]
    assert records(d)[0].detail["trigger"] == "test_vectors"


@pytest.mark.parametrize("phase", [P.SHADOW, P.PROMOTED])
def test_health_gate_trips_roll_back_with_the_gate_and_its_numbers(phase: SwapPhase) -> None:
    """A tripped gate rolls back and records the gate, the reason and the numbers."""
    numbers = {"requests": 400, "errors": 48, "error_rate": 0.12, "max_error_rate": 0.05}
    trip = HealthGateTripped(cycle=1, gate="error_rate", numbers=numbers, reason="0.12 > 0.05")
    d = transition(in_phase(phase), trip, 300.0)
    assert d.state.phase is P.ROLLING_BACK and d.state.last_numbers == numbers
    assert "error_rate" in d.state.last_reason and d.state.rollback_count == 1
    (event,) = records(d)
    assert event.kind == "rollback" and event.detail["numbers"] == numbers
    assert event.detail["automatic"] is True and event.detail["left_phase"] == phase.value
    done = transition(d.state, RollbackDone(cycle=1), 301.0)
    assert done.state.phase is P.ROLLED_BACK and done.state.last_numbers == numbers


def test_rollback_done_restores_blue_and_forgets_green() -> None:
    """RollbackDone ends the rollback: blue stays the committed version, green is cleared."""
    d = transition(in_phase(P.ROLLING_BACK), RollbackDone(cycle=1), 9.0)
    s = d.state
    assert s.phase is P.ROLLED_BACK and (s.blue_version, s.committed_version) == ("1.0.0",) * 2
    assert s.green_sha256 is None and s.stage_source is None


def test_rollback_failed_stays_and_a_new_rollback_retries() -> None:
    """A failed swap to blue keeps rolling_back with the error; Rollback reissues its actions."""
    d = transition(in_phase(P.ROLLING_BACK), RollbackFailed(cycle=1, reason="blue crc"), 9.0)
    assert d.state.phase is P.ROLLING_BACK and "blue crc" in d.state.last_reason
    retry = transition(d.state, Rollback("again"), 10.0)
    assert retry.outcome == "applied" and retry.state.phase is P.ROLLING_BACK
    assert kinds(retry) == ["ReportAck", "StopShadow", "SwapToBlue", "UnloadGreen",
                            "DeleteGreenFiles"]


def test_rolling_back_is_left_by_a_forced_stage_only() -> None:
    """While a rollback is unconfirmed, Stage needs force; forced, it opens a new cycle."""
    s = in_phase(P.ROLLING_BACK)
    assert transition(s, Stage(cid(), SOURCE, "1.2.0"), 9.0).outcome == "refused"
    d = transition(s, Stage(cid(), SOURCE, "1.2.0", force=True), 9.0)
    assert d.state.phase is P.STAGING and d.state.cycle == 2 and d.state.green_sha256 is None


@pytest.mark.parametrize("phase", [P.STAGING, P.STAGED, P.SHADOW, P.PROMOTED])
def test_operator_rollback_from_every_phase_of_a_rollout(phase: SwapPhase) -> None:
    """An operator Rollback works from staging on and does not count for the loop guard."""
    d = transition(in_phase(phase), Rollback("r", "drift on the hub"), 9.0)
    assert d.state.phase is P.ROLLING_BACK and d.state.auto_rollback_times == ()
    assert "drift on the hub" in d.state.last_reason
    assert d.actions[0] == ReportAck("r", "ok", d.reason)


@pytest.mark.parametrize("phase", [P.ROLLED_BACK, P.FAILED])
def test_rollback_where_blue_already_serves_succeeds_without_change(phase: SwapPhase) -> None:
    """Rollback after a rollback or a failed stage is acked ok and changes only the id record."""
    s = in_phase(phase)
    d = transition(s, Rollback("r"), 9.0)
    assert d.outcome == "applied" and d.actions == (ReportAck("r", "ok", d.reason),)
    assert d.state.phase is phase and d.state.rollback_count == s.rollback_count


@pytest.mark.parametrize("phase", [P.IDLE, P.COMMITTED])
def test_rollback_is_refused_before_any_rollout_and_after_a_commit(phase: SwapPhase) -> None:
    """There is nothing to roll back in idle, and a commit is final."""
    d = transition(in_phase(phase), Rollback("r"), 9.0)
    assert d.outcome == "refused" and d.state.phase is phase


def test_stale_outcomes_from_another_cycle_change_nothing() -> None:
    """A late report of an abandoned cycle is refused, so it cannot pose as the current one."""
    s = drive(in_phase(P.FAILED), Stage(cid(), SOURCE, "1.2.0"))
    d = transition(s, verified(cycle=1, version="1.2.0"), 9.0)
    assert (d.outcome, d.state, d.actions) == ("refused", s, ())
    assert "stale" in d.reason


# --- the table, exhaustively -----------------------------------------------------------------


def test_the_two_tables_partition_every_phase_and_event_type() -> None:
    """Every (phase, event type) pair is handled or refused with a reason, never both."""
    pairs = {(p, e) for p in SwapPhase for e in EVENT_TYPES}
    assert set(TRANSITIONS).isdisjoint(REFUSED)
    assert set(TRANSITIONS) | set(REFUSED) == pairs
    assert all(reason.strip() for reason in REFUSED.values())


@pytest.mark.parametrize("phase", list(SwapPhase))
@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_every_pair_decides_and_keeps_a_valid_state(phase: SwapPhase, event_type: type) -> None:
    """Each pair returns a Decision in its declared targets; refusals change nothing but ids."""
    s = in_phase(phase)
    event = sample(event_type, s.cycle)
    d = transition(s, event, 1000.0)
    assert isinstance(d, Decision) and d.outcome in ("applied", "refused")
    SwapState.from_dict(json.loads(json.dumps(d.state.to_dict(), allow_nan=False)))
    edge = TRANSITIONS.get((phase, event_type))
    if edge is not None:
        assert d.state.phase in edge.targets
    else:
        assert d.outcome == "refused" and d.state.phase is phase
        assert REFUSED[(phase, event_type)] in d.reason or "stale" in d.reason
    if d.outcome == "refused":
        rest = d.state.to_dict() | {"recent_commands": None, "updated_at": None}
        assert rest == s.to_dict() | {"recent_commands": None, "updated_at": None}
    if isinstance(event, Command):
        status: Literal["ok", "refused"] = "ok" if d.outcome == "applied" else "refused"
        assert d.actions[0] == ReportAck(event.id, status, d.reason)
    else:
        assert not any(isinstance(a, ReportAck) for a in d.actions)


def _graph() -> dict[SwapPhase, set[SwapPhase]]:
    graph: dict[SwapPhase, set[SwapPhase]] = {p: set() for p in SwapPhase}
    for (phase, _), edge in TRANSITIONS.items():
        graph[phase] |= edge.targets
    return graph


def _reachable(graph: dict[SwapPhase, set[SwapPhase]], start: SwapPhase) -> set[SwapPhase]:
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in graph[todo.popleft()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_phase_has_a_way_out_to_committed_and_to_rolled_back() -> None:
    """From every phase the table reaches both committed and rolled_back: no wedged device."""
    graph = _graph()
    for phase in SwapPhase:
        assert graph[phase] - {phase}, f"{phase} has no edge to another phase"
        assert {P.COMMITTED, P.ROLLED_BACK} <= _reachable(graph, phase), phase


def test_idle_is_only_the_first_boot_and_every_resting_phase_accepts_a_stage() -> None:
    """No edge leads back to idle, and Stage leaves every resting phase for staging."""
    assert all(P.IDLE not in edge.targets for (phase, _), edge in TRANSITIONS.items()
               if phase is not P.IDLE)
    for phase in RESTING:
        assert P.STAGING in TRANSITIONS[(phase, Stage)].targets


def _alphabet(s: SwapState) -> Iterator[Event]:
    """Events that exercise every branch of every handler from state ``s``."""
    c = max(s.cycle, 1)
    for version, force in (("1.2.0", False), ("0.9.0", False), ("0.9.0", True), (None, False)):
        yield Stage(cid(), SOURCE, version, force)
    yield from (Shadow(cid()), Promote(cid()), Commit(cid()), Rollback(cid()), AgentStarted())
    yield from (verified(c, "1.2.0"), verified(c, "0.9.0"), verified(c, "1.2.0", OTHER))
    yield from (sample(t, c) for t in EVENT_TYPES if t not in COMMAND_TYPES)


def test_every_declared_target_is_reached_by_some_event() -> None:
    """A search over concrete states observes exactly the (phase, event, target) edges declared."""
    observed: set[tuple[SwapPhase, type, SwapPhase]] = set()
    seen: set[tuple[Any, ...]] = set()
    todo = deque([(initial(), 0)])
    while todo:
        s, depth = todo.popleft()
        key = (s.phase, s.green_version, s.green_sha256, s.stage_version, s.stage_force,
               s.start_count_since_promotion, len(s.auto_rollback_times))
        if key in seen or depth > 14:
            continue
        seen.add(key)
        for event in _alphabet(s):
            d = transition(s, event, 1000.0 + depth)
            observed.add((s.phase, type(event), d.state.phase))
            todo.append((d.state, depth + 1))
    declared = {(p, e, t) for (p, e), edge in TRANSITIONS.items() for t in edge.targets}
    assert declared <= observed
    assert {(p, e, t) for p, e, t in observed if t is not p} <= declared


# --- idempotency, persistence ----------------------------------------------------------------

_VERSIONS = (None, "0.9.0", "1.0.0", "1.1.0", "2.0.0-rc.1", "2.0.0")
# One step of a random walk: (event kind, command id, version, force, sha256, cycle offset, dt).
# Kinds past the event types mean "the next step of the happy path", so walks get deep.
# Outcomes name the current cycle, or (stale) the next or the previous one.
_steps = st.lists(st.tuples(
    st.integers(0, 2 * len(EVENT_TYPES) - 1), st.sampled_from([f"id-{i}" for i in range(30)]),
    st.sampled_from(_VERSIONS), st.booleans(), st.sampled_from([GREEN, GREEN, OTHER]),
    st.sampled_from([0, 0, 0, 0, 1, -1]), st.floats(0.0, 2000.0)), max_size=60)


def _planned(s: SwapState, cmd: str, version: str | None, flag: bool) -> Event:
    """The event that moves ``s`` forward along the happy path (``flag`` picks a branch)."""
    if s.phase is P.STAGING and s.green_sha256 is None:
        return verified(s.cycle, s.stage_version or version or "1.1.0")
    if s.phase is P.STAGING:
        return GreenTestVectorsPassed(cycle=s.cycle)
    if s.phase is P.STAGED:
        return Shadow(cmd) if flag else Promote(cmd)
    if s.phase is P.SHADOW:
        return Promote(cmd)
    if s.phase is P.PROMOTED:
        return Commit(cmd) if flag else AgentStarted()
    if s.phase is P.ROLLING_BACK:
        return RollbackDone(cycle=s.cycle)
    return Stage(cmd, SOURCE, version, flag)


def _event(step: tuple[int, str, str | None, bool, str, int, float], s: SwapState) -> Event:
    kind, cmd, version, force, sha, offset, _ = step
    c = max(s.cycle + offset, 1)
    if kind >= len(EVENT_TYPES):
        return _planned(s, cmd, version, force)
    event_type = EVENT_TYPES[kind]
    if event_type is Stage:
        return Stage(cmd, SOURCE, version, force)
    if event_type is Rollback:
        return Rollback(cmd, "drift")
    if event_type in COMMAND_TYPES:
        return event_type(cmd)
    if event_type is StageVerified:
        return StageVerified(cycle=c, version=version or "1.1.0", sha256=sha, path="/green/x")
    return sample(event_type, c)


def _walk(steps: list[Any]) -> Iterator[tuple[SwapState, Event, Decision]]:
    s, now = initial(), 0.0
    for step in steps:
        event = _event(step, s)
        now += step[-1]
        d = transition(s, event, now)
        yield s, event, d
        s = d.state


@SETTINGS
@given(_steps)
def test_a_repeated_command_id_never_changes_anything(steps: list[Any]) -> None:
    """Random sequences with reused ids: a seen id is a duplicate with the original ack."""
    answered: dict[str, ReportAck] = {}
    for before, event, d in _walk(steps):
        if not isinstance(event, Command):
            continue
        if event.id in answered:
            assert d.outcome == "duplicate" and d.state is before
            assert d.actions == (answered[event.id],)
        else:
            ack = d.actions[0]
            assert isinstance(ack, ReportAck) and ack.command_id == event.id
            answered[event.id] = ack


@SETTINGS
@given(_steps)
def test_every_reachable_state_roundtrips_through_strict_json(steps: list[Any]) -> None:
    """to_dict, strict JSON and from_dict give back an equal state, at every step of a walk."""
    for _, _, d in _walk(steps):
        text = json.dumps(d.state.to_dict(), allow_nan=False)
        assert SwapState.from_dict(json.loads(text)) == d.state
        assert all(json.dumps(as_json(a), allow_nan=False) for a in d.actions)


@pytest.mark.parametrize("version", [0, 2, SCHEMA_VERSION + 1, None, "1"])
def test_unknown_schema_versions_are_refused(version: object) -> None:
    """A state written under another schema version is an error that names the version."""
    data = in_phase(P.PROMOTED).to_dict() | {"schema_version": version}
    with pytest.raises(SwapError, match="schema_version"):
        SwapState.from_dict(data)


@pytest.mark.parametrize("change", [
    {"phase": "limbo"}, {"extra": 1}, {"green_sha256": None}, {"cycle": -1},
    {"recent_commands": [{"id": 3, "status": "ok", "reason": ""}]}, {"stage_force": 1},
    {"last_numbers": {"x": "nan"}}, {"promoted_at": None},
])
def test_malformed_or_inconsistent_states_are_refused(change: dict[str, Any]) -> None:
    """Unknown fields, bad types and broken invariants are SwapErrors, an AgentError."""
    with pytest.raises(AgentError):
        SwapState.from_dict(in_phase(P.PROMOTED).to_dict() | change)
    data = in_phase(P.PROMOTED).to_dict()
    del data["phase"]
    with pytest.raises(SwapError, match="missing"):
        SwapState.from_dict(data)


def test_command_ids_are_remembered_up_to_the_bound() -> None:
    """The id record keeps the latest RECENT_COMMANDS answers; older ids are forgotten."""
    s = initial()
    for i in range(RECENT_COMMANDS + 5):
        s = transition(s, Commit(f"k{i}"), float(i)).state
    assert len(s.recent_commands) == RECENT_COMMANDS
    assert s.answer_to("k4") is None and s.answer_to(f"k{RECENT_COMMANDS + 4}") is not None


# --- downgrades ------------------------------------------------------------------------------


def test_a_downgrade_is_refused_unless_forced() -> None:
    """Staging a version older than the committed one needs force, and force is recorded."""
    s = initial()
    d = transition(s, Stage("old", SOURCE, "0.9.0"), 1.0)
    assert d.outcome == "refused" and "older than the committed 1.0.0" in d.reason
    assert d.state.phase is P.IDLE
    d = transition(s, Stage("old-forced", SOURCE, "0.9.0", force=True), 1.0)
    assert d.state.phase is P.STAGING and "downgrade" in d.reason
    assert drive(d.state, verified(version="0.9.0")).green_version == "0.9.0"


def test_the_verified_manifest_version_is_checked_against_the_floor_too() -> None:
    """A Stage without a version cannot smuggle a downgrade: the verified version is checked."""
    s = drive(initial(), Stage(cid(), SOURCE))
    d = transition(s, verified(version="0.9.0"), 2.0)
    assert d.state.phase is P.FAILED and "downgrade" in d.reason
    forced = drive(initial(), Stage(cid(), SOURCE, force=True))
    assert transition(forced, verified(version="0.9.0"), 2.0).state.phase is P.STAGING


def test_equal_versions_and_non_semver_versions() -> None:
    """The same version may be staged again; a version that is not SemVer is refused."""
    assert transition(initial(), Stage(cid(), SOURCE, "1.0.0"), 1.0).outcome == "applied"
    d = transition(initial(), Stage(cid(), SOURCE, "v1"), 1.0)
    assert d.outcome == "refused" and "semantic version" in d.reason


@pytest.mark.parametrize(("older", "newer"), [
    ("1.0.0", "1.0.1"), ("1.9.9", "1.10.0"), ("1.0.0-rc.1", "1.0.0"),
    ("1.0.0-rc.2", "1.0.0-rc.10"), ("1.0.0-alpha", "1.0.0-alpha.1"),
    ("1.0.0-1", "1.0.0-alpha"), ("1.0.0-alpha.beta", "1.0.0-beta"),
])
def test_is_older_follows_semver_precedence(older: str, newer: str) -> None:
    """SemVer 2.0.0 §11: releases outrank their pre-releases; numeric ids compare as numbers."""
    assert is_older(older, newer) and not is_older(newer, older)
    assert not is_older(older, older) and not is_older(older, None)
    assert not is_older("1.0.0+build.1", "1.0.0+build.2")


# --- the crash-loop counter ------------------------------------------------------------------


def test_the_third_start_after_a_promotion_boots_blue() -> None:
    """Starts 1 and 2 reload green and count; start 3 rolls back as a crash loop, with numbers."""
    s = in_phase(P.PROMOTED)
    for n in (1, 2):
        d = transition(s, AgentStarted(), 200.0 + n)
        s = d.state
        assert s.phase is P.PROMOTED and s.start_count_since_promotion == n
        assert kinds(d) == ["LoadGreen", "SwapToGreen"]
    d = transition(s, AgentStarted(), 203.0)
    assert d.state.phase is P.ROLLING_BACK and "crash loop" in d.reason
    assert d.state.last_numbers["starts"] == 3 and d.state.start_count_since_promotion == 0
    assert SwapToBlue() in d.actions and LoadGreen(1, "/green/1") not in d.actions
    assert d.state.auto_rollback_times == (203.0,)


def test_the_start_limit_comes_from_the_policy() -> None:
    """With max_starts_before_rollback=1 the first start after a promotion boots blue."""
    d = transition(in_phase(P.PROMOTED), AgentStarted(), 9.0,
                   SwapPolicy(max_starts_before_rollback=1))
    assert d.state.phase is P.ROLLING_BACK


@pytest.mark.parametrize("phase", [p for p in SwapPhase if p is not P.PROMOTED])
def test_starts_outside_promoted_resume_without_counting(phase: SwapPhase) -> None:
    """AgentStarted elsewhere changes no state and asks for the phase's resume actions."""
    s = in_phase(phase)
    d = transition(s, AgentStarted(), 9.0)
    assert d.state is s and d.actions == resume_actions(s)


def test_resume_actions_per_phase() -> None:
    """A restart redoes the step each phase was in: download, load, shadow, swap or cleanup."""
    mid = in_phase(P.STAGING)
    assert resume_actions(mid) == (DownloadAndVerify(1, SOURCE),)
    assert resume_actions(drive(mid, verified())) == (LoadGreen(1, "/green/1"),)
    assert resume_actions(in_phase(P.SHADOW)) == (LoadGreen(1, "/green/1"), StartShadow())
    assert resume_actions(in_phase(P.PROMOTED)) == (LoadGreen(1, "/green/1"), SwapToGreen())
    assert resume_actions(in_phase(P.COMMITTED)) == (CommitGreen(),)
    assert resume_actions(in_phase(P.ROLLING_BACK)) == (
        StopShadow(), SwapToBlue(), UnloadGreen(), DeleteGreenFiles())
    assert resume_actions(in_phase(P.FAILED)) == (DeleteGreenFiles(),)
    assert resume_actions(initial()) == ()


# --- the rollback-loop guard -----------------------------------------------------------------


def _auto_rollback(s: SwapState, now: float) -> SwapState:
    """Stage, load, promote, trip a gate and finish the rollback, all at ``now``."""
    stage = transition(s, Stage(cid(), SOURCE, "1.2.0"), now)
    assert stage.outcome == "applied", stage.reason
    c = stage.state.cycle
    s = drive(stage.state, verified(c, "1.2.0"), GreenTestVectorsPassed(cycle=c),
              Promote(cid()), now=now)
    trip = HealthGateTripped(cycle=c, gate="nonfinite", numbers={"n": 1.0}, reason="NaN")
    return drive(s, trip, RollbackDone(cycle=c), now=now)


def test_the_loop_guard_refuses_a_stage_after_max_rollbacks_in_the_window() -> None:
    """Three automatic rollbacks within an hour: the next Stage is refused with the count."""
    s = initial()
    for t in (0.0, 600.0, 1200.0):
        s = _auto_rollback(s, t)
    d = transition(s, Stage("next", SOURCE, "1.2.0"), 1300.0)
    assert d.outcome == "refused" and "3 automatic rollbacks" in d.reason
    assert d.state.phase is P.ROLLED_BACK and len(d.state.auto_rollback_times) == 3


def test_a_forced_stage_clears_the_loop_guard() -> None:
    """An operator's forced Stage passes the guard and resets its history."""
    s = initial()
    for t in (0.0, 600.0, 1200.0):
        s = _auto_rollback(s, t)
    d = transition(s, Stage("ops", SOURCE, "1.2.0", force=True), 1300.0)
    assert d.state.phase is P.STAGING and d.state.auto_rollback_times == ()
    assert "loop guard reset" in d.reason
    assert records(d)[0].detail["overrides"] == ["loop guard reset after 3 automatic rollbacks"]


def test_the_guard_opens_again_once_rollbacks_leave_the_window() -> None:
    """A Stage is accepted once the oldest rollback is more than the window ago."""
    s = initial()
    for t in (0.0, 600.0, 1200.0):
        s = _auto_rollback(s, t)
    assert transition(s, Stage(cid(), SOURCE, "1.2.0"), 3599.0).outcome == "refused"
    assert transition(s, Stage(cid(), SOURCE, "1.2.0"), 3600.0).outcome == "applied"


def test_operator_rollbacks_do_not_count_and_future_timestamps_do() -> None:
    """Operator rollbacks never trip the guard; a clock that went back keeps old ones recent."""
    s = initial()
    for _ in range(5):
        c = s.cycle + 1
        s = drive(s, Stage(cid(), SOURCE, "1.2.0"), Rollback(cid()), RollbackDone(cycle=c))
    assert s.rollback_count == 5 and s.auto_rollback_times == ()
    s = initial()
    for t in (5000.0, 5001.0, 5002.0):
        s = _auto_rollback(s, t)
    assert transition(s, Stage(cid(), SOURCE, "1.2.0"), 10.0).outcome == "refused"


# --- local health gates ----------------------------------------------------------------------

_BLUE_STATS = HealthStats(requests=500, errors=1, p99_us=1000.0)


def test_too_little_evidence_never_trips() -> None:
    """Below min_requests_for_gates even all errors and NaNs are "not enough evidence"."""
    bad = HealthStats(requests=49, errors=49, nonfinite_outputs=49, p99_us=1e9)
    assert judge_health(POLICY, bad, _BLUE_STATS, cycle=1) is None


@SETTINGS
@given(st.integers(0, 49), st.data())
def test_no_stats_below_the_minimum_trip(requests: int, data: st.DataObject) -> None:
    """Whatever green did over fewer than 50 requests, no gate trips."""
    green = HealthStats(requests, data.draw(st.integers(0, requests)),
                        data.draw(st.integers(0, 10**6)), data.draw(st.floats(0, 1e12)))
    assert judge_health(POLICY, green, _BLUE_STATS, cycle=1) is None


def test_error_rate_gate() -> None:
    """An error rate above max_error_rate trips with requests, errors and the rate."""
    assert judge_health(POLICY, HealthStats(100, 5), _BLUE_STATS, cycle=1) is None
    trip = judge_health(POLICY, HealthStats(100, 6), _BLUE_STATS, cycle=4)
    assert trip is not None and (trip.gate, trip.cycle) == ("error_rate", 4)
    assert trip.numbers == {"requests": 100, "errors": 6, "error_rate": 0.06,
                            "max_error_rate": 0.05}


def test_nonfinite_gate() -> None:
    """One NaN/inf output over enough requests trips the nonfinite gate first."""
    trip = judge_health(POLICY, HealthStats(60, 30, nonfinite_outputs=1), None, cycle=1)
    assert trip is not None and trip.gate == "nonfinite"
    assert trip.numbers["nonfinite_outputs"] == 1


def test_p99_ratio_gate() -> None:
    """Green's p99 above max_p99_ratio times blue's trips; without blue evidence it cannot."""
    assert judge_health(POLICY, HealthStats(100, p99_us=2000.0), _BLUE_STATS, cycle=1) is None
    trip = judge_health(POLICY, HealthStats(100, p99_us=2500.0), _BLUE_STATS, cycle=1)
    assert trip is not None and trip.gate == "p99_latency" and trip.numbers["p99_ratio"] == 2.5
    slow = HealthStats(100, p99_us=1e6)
    assert judge_health(POLICY, slow, None, cycle=1) is None
    assert judge_health(POLICY, slow, HealthStats(10, p99_us=1.0), cycle=1) is None
    zero = judge_health(POLICY, slow, HealthStats(100, p99_us=0.0), cycle=1)
    assert zero is not None and zero.numbers["p99_ratio"] == 1e6


def test_a_judged_trip_feeds_the_machine() -> None:
    """judge_health's result is an event the machine accepts in promoted."""
    trip = judge_health(POLICY, HealthStats(100, 50), _BLUE_STATS, cycle=1)
    assert trip is not None
    assert transition(in_phase(P.PROMOTED), trip, 9.0).state.phase is P.ROLLING_BACK


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: Stage("", SOURCE), lambda: Stage("x" * 129, SOURCE), lambda: Stage("i", ""),
    lambda: StageVerified(cycle=1, version="1.0.0", sha256="ABC", path="/p"),
    lambda: StageFailed(cycle=0, reason="x"),
    lambda: HealthGateTripped(cycle=1, gate="nonfinite", numbers={"x": float("inf")}, reason="r"),
    lambda: HealthGateTripped(cycle=1, gate="cpu", numbers={}, reason="r"),  # type: ignore[arg-type]
    lambda: HealthStats(requests=1, errors=2), lambda: HealthStats(1, p99_us=float("nan")),
    lambda: SwapPolicy(max_error_rate=1.5), lambda: SwapPolicy(max_rollbacks=0),
    lambda: SwapPolicy(rollback_window_seconds=float("inf")),
])
def test_malformed_events_policies_and_stats_are_errors(build: Any) -> None:
    """Inputs that no runner should build raise SwapError at construction."""
    with pytest.raises(SwapError):
        build()


def test_programming_errors_raise() -> None:
    """A non-event or a non-finite clock is a SwapError, never a silent decision."""
    with pytest.raises(SwapError, match="not a swap event"):
        transition(initial(), Outcome(cycle=1), 1.0)
    with pytest.raises(SwapError, match="finite"):
        transition(initial(), AgentStarted(), float("nan"))

"""The prediction log's staging (edge_agent.prediction_log) and its retention in the store:
batches copied into reused chunks, consecutive batches stored as one row that still answers
per id, an early flush when a burst fills the chunks, retention counted in predictions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edge_agent.prediction_log as plog
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, TelemetryConfig
from edge_agent.errors import FeedbackError
from edge_agent.prediction_log import (
    CHUNK_BYTES,
    MAX_ROW_PREDICTIONS,
    PendingLog,
    Run,
    code_dtype,
    prediction_rows,
)
from edge_agent.store import AgentStore, WriteBatch
from tests.conftest import make_classification_data

T0 = 1_700_000_000.0


class _Loaded:
    def __init__(self, name: str = "m", version: str = "1.0.0") -> None:
        self.name, self.version = name, version


def _text(n: int) -> np.ndarray:
    return np.array([f"c{k}" for k in range(n)] + ["?"], dtype=object)


def test_batches_are_copied_narrowed_into_chunks_that_are_reused() -> None:
    """Codes and scores are copies (the caller may reuse its arrays), codes narrowed to the
    label set's width; chunks given back are the ones the next batches write into."""
    log = PendingLog()
    loaded: Any = _Loaded()
    text = _text(3)
    codes = np.array([0, 1, 2, 3], dtype=np.int64)
    scores = np.array([0.5, 0.25, 0.125, 1.0])
    log.add_batch(0, T0, loaded, scores, codes, text, None)
    codes[:] = 0
    scores[:] = 0.0
    taken = log.take()
    (entry,) = taken.entries
    assert not isinstance(entry, Run)
    assert entry.codes.dtype == np.dtype("<u1")  # type: ignore[union-attr]
    assert entry.codes.tolist() == [0, 1, 2, 3]  # type: ignore[union-attr]
    assert entry.scores.dtype == np.dtype("<f4") and entry.scores.tolist() == [0.5, 0.25,
                                                                               0.125, 1.0]
    first_chunk = taken.chunks[0]
    log.give_back(taken.chunks)
    log.add_batch(4, T0, loaded, scores, codes, text, None)
    assert log.take().chunks[0] is first_chunk
    assert code_dtype(256) == np.dtype("<u1") and code_dtype(257) == np.dtype("<u2")
    assert code_dtype(65537) == np.dtype("<u4")


def test_a_burst_asks_for_an_early_flush_and_a_huge_batch_gets_its_own_block() -> None:
    log = PendingLog()
    loaded: Any = _Loaded()
    n = 1024
    per = 4 * n + n  # scores + 1-byte codes
    first_of_last = (plog.FLUSH_SOON_CHUNKS - 1) * (CHUNK_BYTES // per)
    asks = [log.add_batch(k * n, T0, loaded, np.zeros(n), np.zeros(n, np.int64), _text(2), None)
            for k in range(first_of_last + 1)]
    assert not any(asks[:-1]) and asks[-1]  # the batch that starts the last chunk asks
    assert log.chunks_in_use == plog.FLUSH_SOON_CHUNKS
    big = CHUNK_BYTES // 4 + 1
    log.add_batch(0, T0, loaded, np.ones(big), None, None, np.array(["x"] * big, dtype=object))
    taken = log.take()
    assert taken.chunks[-1].size >= 4 * big
    log.give_back(taken.chunks)  # the huge block is not kept
    assert all(c.size == CHUNK_BYTES for c in log._free)


def test_deferred_batches_count_toward_the_early_flush() -> None:
    """A deferred batch's entry holds views of its stage's arrays, not chunk space: their
    bytes count toward the same bound, and a take starts the count again."""
    log = PendingLog()
    loaded: Any = _Loaded()
    n = 4096
    per = 4 * n + n  # float32 scores + 1-byte codes
    bound = plog.FLUSH_SOON_CHUNKS * CHUNK_BYTES
    asks = [log.add_deferred(k * n, T0, loaded, np.zeros(n, np.float32),
                             np.zeros(n, np.uint8), _text(2)) for k in range(bound // per + 1)]
    assert not any(asks[:-1]) and asks[-1] and log.chunks_in_use == 0
    taken = log.take()
    assert taken.deferred == len(asks)
    assert not log.add_deferred(0, T0, loaded, np.zeros(n, np.float32), np.zeros(n, np.uint8),
                                _text(2))


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["batch", "run", "other-model"]),
                          st.integers(1, 3000)), min_size=1, max_size=25))
def test_stored_rows_answer_every_id_as_served(tmp_path_factory: pytest.TempPathFactory,
                                               steps: list[tuple[str, int]]) -> None:
    """Whatever mix of batches, single-row runs and models: each id reads back its own label
    and score, and no stored row holds more than MAX_ROW_PREDICTIONS or mixes models."""
    rng = np.random.default_rng(len(steps))
    log = PendingLog()
    models: Any = {"m": _Loaded("m"), "other-model": _Loaded("o")}
    text = _text(5)
    expected: dict[int, tuple[str, float]] = {}
    next_batch = 1 << 48
    next_single = 0
    for kind, n in steps:
        scores = rng.random(n).astype(np.float32)
        if kind == "run":
            run = log.run = Run(next_single, T0, models["m"])
            log.entries.append(run)
            for k in range(min(n, 50)):
                run.labels.append("r")
                run.scores.append(float(scores[k]))
                expected[next_single] = ("r", float(scores[k]))
                next_single += 1
            continue
        codes = rng.integers(0, len(text), n)
        loaded = models["m" if kind == "batch" else "other-model"]
        log.add_batch(next_batch, T0, loaded, scores, codes, text, None)
        for k in range(n):
            expected[next_batch + k] = (str(text[codes[k]]), float(scores[k]))
        next_batch += n
    rows = prediction_rows("boot", log.take().entries)
    assert all(r[2] <= MAX_ROW_PREDICTIONS for r in rows)
    store = AgentStore(tmp_path_factory.mktemp("log") / "agent.db",
                       keep_predictions=10 ** 9)
    try:
        store.write(WriteBatch(predictions=rows))
        for k in list(expected)[:: max(1, len(expected) // 200)] + list(expected)[-3:]:
            got = store.prediction(f"boot-{k:x}")
            assert got is not None, k
            assert (got["label"], got["score"]) == expected[k]
    finally:
        store.close()


def test_consecutive_batches_of_one_model_are_one_row_up_to_the_cap() -> None:
    log = PendingLog()
    a: Any = _Loaded("a")
    b: Any = _Loaded("b")
    text = _text(2)
    first = 0
    for loaded in (a, a, a, b, a):
        log.add_batch(first, T0, loaded, np.zeros(1000), np.zeros(1000, np.int64), text, None)
        first += 1000
    rows = prediction_rows("boot", log.take().entries)
    assert [(r[1], r[2], r[4]) for r in rows] == [(0, 3000, "a"), (3000, 1000, "b"),
                                                  (4000, 1000, "a")]
    assert len(rows[0][7]) == 4 * 3000 and len(rows[0][8]) == 3000  # type: ignore[arg-type]
    n = MAX_ROW_PREDICTIONS // 2 + 1
    for k in range(3):
        log.add_batch(k * n, T0, a, np.zeros(n), np.zeros(n, np.int64), text, None)
    assert [r[2] for r in prediction_rows("boot", log.take().entries)] == [n, n, n]


def test_retention_counts_predictions_not_rows(tmp_path: Path) -> None:
    """keep_predictions bounds the predictions kept, however many each row holds; the oldest
    rows go first, and the count survives a reopen."""
    db = tmp_path / "agent.db"
    store = AgentStore(db, keep_predictions=2500)
    try:
        for k in range(6):
            row = ("boot", k * 1000, 1000, T0 + k, "m", "1", None,
                   np.zeros(1000, "<f4").tobytes(), np.zeros(1000, "<u1").tobytes(), '["x"]')
            store.write(WriteBatch(predictions=[row]))
            kept = [r[0] for r in store.db.execute("SELECT first FROM predictions ORDER BY first")]
            total = 1000 * len(kept)
            assert total >= min(2500, 1000 * (k + 1)) and total - 1000 < 2500
            assert kept == sorted(kept) and kept[-1] == k * 1000
    finally:
        store.close()
    store = AgentStore(db, keep_predictions=1000)
    try:
        store.write(WriteBatch(predictions=[("boot", 6000, 10, T0 + 6, "m", "1", '["x"]' * 0
                                             + '["x","x","x","x","x","x","x","x","x","x"]',
                                             np.zeros(10, "<f4").tobytes(), None, None)]))
        ns = [r[0] for r in store.db.execute("SELECT n FROM predictions ORDER BY rowid")]
        assert ns == [1000, 10]  # 1,010 >= 1,000, and dropping the oldest would leave 10
    finally:
        store.close()


def test_the_horizon_is_what_retention_kept(tmp_path: Path) -> None:
    """How far back feedback can reach: the predictions kept and the oldest one's time, after
    retention dropped the oldest rows (and nothing at all in a new log)."""
    store = AgentStore(tmp_path / "agent.db", keep_predictions=2500)
    try:
        assert store.prediction_horizon() == (0, None)
        for k in range(5):
            row = ("boot", k * 1000, 1000, T0 + 60 * k, "m", "1", None,
                   np.zeros(1000, "<f4").tobytes(), np.zeros(1000, "<u1").tobytes(), '["x"]')
            store.write(WriteBatch(predictions=[row]))
        assert store.prediction_horizon() == (3000, T0 + 120)  # rows 2, 3, 4 kept
        assert store.prediction("boot-7cf") is None  # 1999: dropped with its row
        assert store.prediction("boot-7d0") is not None  # 2000: the oldest kept
        # a clock set back (a device without a real-time clock, before NTP): the oldest is
        # the first inserted, as for retention, not the earliest time
        row = ("boot", 5000, 1000, T0 - 86400, "m", "1", None,
               np.zeros(1000, "<f4").tobytes(), np.zeros(1000, "<u1").tobytes(), '["x"]')
        store.write(WriteBatch(predictions=[row]))
        assert store.prediction_horizon() == (3000, T0 + 180)
    finally:
        store.close()


def test_feedback_for_a_prediction_past_the_horizon_says_how_far_back_the_log_reaches(
        tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    config = AgentConfig(data_dir=tmp_path / "agent", trusted_keys=(keypair.public_path,),
                         bundle=small_bundle.path,
                         telemetry=TelemetryConfig(keep_predictions=100))
    X, _ = make_classification_data(n=400, d=6, seed=3)
    with Agent(config, start_writer=False) as agent:
        old = agent.predict(np.ascontiguousarray(X[:150], dtype=np.float32))
        agent.flush()
        new = agent.predict(np.ascontiguousarray(X[150:300], dtype=np.float32))
        agent.flush()
        with pytest.raises(FeedbackError) as err:
            agent.feedback(old.ids[0], old.labels[0])
        assert err.value.status == 404
        message = str(err.value)
        assert "older than the predictions kept (150 kept, logged since " in message
        assert "; [telemetry] keep_predictions = 100 sets how many)" in message
        assert agent.feedback(new.ids[0], new.labels[0])["correct"] == 1


def test_rows_retention_would_delete_at_once_are_not_written(tmp_path: Path) -> None:
    """A flush holding more than keep_predictions writes only the newest rows that retention
    keeps: the same table as writing all and trimming, without the writes."""

    def row(k: int) -> Any:
        return ("boot", k * 1000, 1000, T0 + k, "m", "1", None,
                np.full(1000, k, "<f4").tobytes(), np.zeros(1000, "<u1").tobytes(), '["x"]')

    store = AgentStore(tmp_path / "agent.db", keep_predictions=2500)
    try:
        written: list[int] = []
        store.db.conn.set_trace_callback(
            lambda sql: written.append(1) if sql.startswith("INSERT OR IGNORE INTO pred") else None)
        store.write(WriteBatch(predictions=[row(k) for k in range(6)]))
        assert len(written) == 3  # rows 3, 4, 5: 3,000 >= 2,500; without row 3, 2,000 < 2,500
        kept = [r[0] for r in store.db.execute("SELECT first FROM predictions ORDER BY first")]
        assert kept == [3000, 4000, 5000]
        got = store.prediction("boot-" + format(5999, "x"))
        assert got is not None and got["score"] == 5.0
        assert store.prediction("boot-" + format(2999, "x")) is None
    finally:
        store.close()


def test_a_burst_of_batches_is_flushed_before_the_interval(tmp_path: Path, keypair: Any,
                                                           small_bundle: Any,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """With a 60 s flush interval, batches filling FLUSH_SOON_CHUNKS chunks wake the writer:
    their predictions are in the database long before the interval is up (the windows wait
    for it)."""
    monkeypatch.setattr(plog, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(plog, "FLUSH_SOON_CHUNKS", 2)
    config = AgentConfig(data_dir=tmp_path / "agent", trusted_keys=(keypair.public_path,),
                         bundle=small_bundle.path,
                         telemetry=TelemetryConfig(flush_interval_seconds=60))
    X, _ = make_classification_data(n=400, d=6, seed=3)
    with Agent(config) as agent:
        results = [agent.predict(np.ascontiguousarray(X[:400], dtype=np.float32))
                   for _ in range(6)]
        deadline = time.monotonic() + 20
        while agent.store.count("predictions") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.store.count("predictions") > 0
        assert agent.store.count("windows") == 0  # checkpointed at the interval, not per burst
        got = agent.store.prediction(results[0].ids[-1])
        assert got is not None and got["label"] == results[0].labels[-1]


def test_a_regressor_batch_is_logged_by_its_values_and_labels_are_made_when_read(
        tmp_path: Path, keypair: Any, regressor_bundle: Any) -> None:
    """A regressor's batch is served without building its value strings (they cost several
    times the inference) and logged by its float32 values alone; its labels, when read, and
    each id's stored label are the values' text, as before."""
    from tests.conftest import make_regression_data

    config = AgentConfig(data_dir=tmp_path / "agent", trusted_keys=(keypair.public_path,),
                         bundle=regressor_bundle.path)
    X, _ = make_regression_data(n=300, d=4, seed=5)
    with Agent(config, start_writer=False) as agent:
        result = agent.predict(np.ascontiguousarray(X, dtype=np.float32))
        assert result.prediction._labels is None  # nothing built yet
        single = agent.predict(np.ascontiguousarray(X[0], dtype=np.float32))
        agent.flush()
        rows = agent.store.db.execute("SELECT n, labels, codes FROM predictions "
                                      "ORDER BY first DESC").fetchall()
        assert (rows[0][0], rows[0][1], rows[0][2]) == (300, None, None)
        values = result.values
        assert values is not None
        assert result.labels.tolist() == values.astype(str).tolist()
        for i in (0, 1, 150, 299):
            got = agent.store.prediction(result.ids[i])
            assert got is not None
            assert got["label"] == str(values[i]) and got["score"] == float(values[i])
        got = agent.store.prediction(single.id)
        assert got is not None and got["label"] == single.labels[0]

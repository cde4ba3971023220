"""The agent: verified models in slots, serving, telemetry, and the writer thread.

Serving never waits on disk, nor on the sketches: :meth:`Agent.predict` validates,
preprocesses (numba), runs onnxruntime, copies the rows into in-memory telemetry, and a fold
thread sketches them (:mod:`edge_agent.telemetry`). A writer thread commits every
``flush_interval_seconds`` (default 1 s) in one SQLite transaction with ``synchronous=FULL``,
after folding every row served before the flush: a power cut loses at most the last interval
of the open window's sketch updates and prediction records; a committed window is never lost.

Slots: ``blue`` serves; ``green`` is the candidate slot that the swap (a later issue) fills
beside it. Both hold a :class:`LoadedModel`, so a second model loads next to the first.

Sync: with a ``[sync]`` section the store also writes the outbox (same transactions) and the
agent starts an :class:`edge_agent.sync.Sync` as its constructor ends; the writer wakes it after
each flush, it reads the agent's state through :meth:`Agent.state_message`, and
:meth:`Agent.close` stops it first (offline state published, clean disconnect).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.atomic import atomic_write_bytes
from edge_agent.bundle import (
    load_public_key,
    read_unverified_manifest,
)
from edge_agent.config import AgentConfig
from edge_agent.errors import (
    BundleError,
    FeedbackError,
    InputError,
    NotReadyError,
)
from edge_agent.loaded import LoadedModel, PredictResult, load_model
from edge_agent.model import Prediction, row_scores
from edge_agent.prediction_log import PendingLog, Run, prediction_rows
from edge_agent.store import AgentStore, SlotRecord, WriteBatch
from edge_agent.swap import RESTING
from edge_agent.swap_events import Commit, HealthStats, Promote, Stage, SwapPhase, is_older
from edge_agent.swap_runner import SwapRunner, stats_of
from edge_agent.telemetry import (
    FOLD_QUEUE_STAGES,
    STAGE_ROWS,
    TelemetryRecorder,
)
from fleet_protocol.messages import SlotInfo, Slots, StateMessage

if TYPE_CHECKING:
    from edge_agent.sync import Sync

__all__ = ["Agent", "LoadedModel", "PredictResult"]

log = logging.getLogger(__name__)

SLOTS = ("blue", "green")
_perf_ns = time.perf_counter_ns
_isfinite = math.isfinite


class Agent:
    """The device daemon's core, usable in-process: ``Agent(config).predict(row)``.

    ``stage_rows``, ``fold_queue_stages`` and ``fold_thread`` size the sketching off the request
    path (see :class:`~edge_agent.telemetry.TelemetryRecorder`); the defaults suit serving.
    """

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time,
                 start_writer: bool = True, start_sync: bool = True,
                 stage_rows: int = STAGE_ROWS, fold_queue_stages: int = FOLD_QUEUE_STAGES,
                 fold_thread: bool = True) -> None:
        self.config = config
        self.clock = clock
        self._sample_inputs = config.privacy.sample_inputs
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.trusted = [load_public_key(p) for p in config.trusted_keys]
        self.store = AgentStore(config.db_path, keep_predictions=config.telemetry.keep_predictions,
                                keep_windows=config.telemetry.keep_windows,
                                outbox_quota_bytes=(config.sync.quota_bytes
                                                    if config.sync.enabled else None))
        #: the link to the hub (None: sync not configured, or not started yet)
        self.sync: Sync | None = None
        #: rows are sketched off the request path, by a fold thread (see edge_agent.telemetry)
        self.recorder = TelemetryRecorder(config.telemetry.window_seconds, clock=clock,
                                          stage_rows=stage_rows,
                                          fold_queue_stages=fold_queue_stages,
                                          fold_thread=fold_thread)
        #: ONNX allow-list results by model sha256, persisted (the walk is slow on big trees)
        self.onnx_checked = self.store.onnx_checks()
        self.slots: dict[str, LoadedModel | None] = dict.fromkeys(SLOTS)
        self.boot = secrets.token_hex(4)
        # Ids: "<boot>-<hex counter>". Single rows count up from 0, batches take blocks from
        # 2**48 up, both under _pending_lock.
        self._next_single = 0
        self._next_batch_id = 1 << 48
        #: served requests awaiting the writer (under _pending_lock)
        self._log = PendingLog()
        self._pending_lock = threading.Lock()
        #: set when the pending log asks for a flush before the interval is up
        self._flush_soon = threading.Event()
        #: one flush at a time: what a flush took is committed before another flush returns
        self._flush_lock = threading.Lock()
        self._feedback: list[tuple[str, float, str, str, int | None, float | None]] = []
        self._events: list[tuple[float, str, dict[str, Any]]] = []
        self._samples: list[tuple[str, float, str, str]] = []
        self._rng = np.random.default_rng()
        self._stop = threading.Event()
        self._accepting = True
        self.refusals: list[str] = []
        #: the slot that answers: green only while promoted (the swap runner sets it)
        self.active = "blue"
        self._shadow = False
        self._shadow_queue: queue.Queue[tuple[Any, PredictResult] | None] = queue.Queue(
            maxsize=config.swap.shadow_queue)
        self._shadow_thread: threading.Thread | None = None
        self._load_blue()
        if config.bundle is not None and self.slots["blue"] is None:
            self._offer(config.bundle)
        self.swap = SwapRunner(self, config.swap.policy(), clock=clock)
        self.swap.start()  # counted and persisted before green is loaded again
        if config.bundle is not None and self.slots["blue"] is not None:
            self._offer_as_swap(config.bundle)
        blue = self.slots["blue"]
        if blue is not None:
            for row in self.store.windows(closed=False):
                if not self.recorder.restore(row):
                    self.store.write(WriteBatch(windows=[_closed(row)]))
        if start_sync and config.sync.enabled:
            try:
                self.start_sync()
            except BaseException:  # a bad password file, TLS files: nothing may stay open
                self.store.close()
                raise
        self._writer: threading.Thread | None = None
        if start_writer:
            self._writer = threading.Thread(target=self._write_loop, name="edgefleet-writer",
                                            daemon=True)
            self._writer.start()

    # --- sync --------------------------------------------------------------------------------

    def start_sync(self, **kwargs: Any) -> Sync:
        """Start sending the outbox to the hub (``config.sync``); ``kwargs`` go to
        :class:`~edge_agent.sync.Sync` (``rng``, ``on_command``)."""
        from edge_agent.sync import Sync

        if self.sync is not None:
            return self.sync
        self.sync = Sync.from_config(self.config, self.store, self.state_message, **kwargs)
        self.sync.start()
        return self.sync

    def state_message(self) -> StateMessage:
        """The retained online state: slots, swap phase, tags (the sync publishes it whenever
        anything here but ``ts`` changes)."""
        from edge_agent.sync import AGENT_VERSION

        slots = {slot: None if loaded is None else SlotInfo(
            name=loaded.name, version=loaded.version, sha256=loaded.sha256)
            for slot, loaded in self.slots.items()}
        return StateMessage(
            device_id=self.config.device_id, online=True, agent_version=AGENT_VERSION,
            slots=Slots(**slots), swap_phase=self.swap.state.phase.value,
            health={"ready": self.ready, "active": self.active}, tags=dict(self.config.tags),
            ts=self.clock())

    # --- slots -----------------------------------------------------------------------------

    def _install(self, slot: str, loaded: LoadedModel, reason: str) -> None:
        self.recorder.register(loaded.telemetry, slot)  # before it serves: loads the kernels
        self.slots[slot] = loaded
        m = loaded.bundle.manifest
        self.store.set_slot(
            SlotRecord(slot, m.name, m.version, m.model.sha256, str(loaded.path), self.clock()),
            event=("slot_installed", {"slot": slot, "name": m.name, "version": m.version,
                                      "reason": reason}))

    def _load_blue(self) -> None:
        """Load the installed blue; green is the swap runner's to load (after it counted the
        start, so a green that crashes the process is caught by the start counter)."""
        for slot, rec in self.store.slots().items():
            if slot != "blue":
                continue
            try:
                loaded = load_model(Path(rec.path), self.trusted, self.config, self.onnx_checked)
            except BundleError as err:
                self.refusals.append(str(err))
                log.error("installed %s bundle %s refused: %s", slot, rec.path, err)
                self.store.record_event("bundle_refused", {"slot": slot, "reason": str(err)})
                continue
            self.recorder.register(loaded.telemetry, slot)
            self.slots[slot] = loaded

    def _offer(self, path: Path) -> None:
        """Install the configured bundle as blue if it differs from what blue serves."""
        blue = self.slots["blue"]
        try:
            loaded = load_model(path, self.trusted, self.config, self.onnx_checked)
        except BundleError as err:
            self.refusals.append(str(err))
            self.store.record_event("bundle_refused", {"path": str(path), "reason": str(err)})
            log.error("bundle %s refused: %s%s", path, err,
                      "; keeping the previous model" if blue else "")
            return
        if blue is not None and blue.sha256 == loaded.sha256 and blue.version == loaded.version:
            return
        dest = self.config.bundles_dir / (
            f"{loaded.name}-{loaded.version}-{loaded.sha256[:8]}.edgebundle")
        if dest.resolve() != path.resolve():
            atomic_write_bytes(dest, path.read_bytes())
        loaded = LoadedModel(loaded.bundle, loaded.model, loaded.validator, loaded.telemetry,
                             dest)
        self._install("blue", loaded, reason="configured bundle")
        log.info("serving %s %s from %s", loaded.name, loaded.version, dest)

    def _offer_as_swap(self, path: Path) -> None:
        """A configured bundle that differs from blue replaces it through the swap machine:
        stage (verify, load, test vectors), promote, commit — refused or failed, blue stays."""
        blue = self.slots["blue"]
        assert blue is not None
        try:
            data = path.read_bytes()
        except OSError as err:
            self.refusals.append(f"bundle {path}: {err.strerror}")
            return
        key = hashlib.sha256(data).hexdigest()[:16]
        if self.swap.state.phase not in RESTING:
            return  # a rollout is under way; it decides what serves
        try:  # only to skip work: staging verifies everything again
            claimed = read_unverified_manifest(path)
        except BundleError:
            claimed = None
        if claimed is not None:
            if (claimed.version, claimed.model.sha256) == (blue.version, blue.sha256):
                return  # blue is the configured bundle already
            floor = self.swap.state.committed_version
            if floor is not None and is_older(claimed.version, floor):
                log.info("configured bundle %s (%s) is older than the committed %s; kept out "
                         "of the swap (stage it with force to downgrade)", path,
                         claimed.version, floor)
                return
        result = self.swap.handle(Stage(id=f"config-stage-{key}", source=str(path)))
        if self.swap.state.phase is SwapPhase.STAGED:
            self.swap.handle(Promote(id=f"config-promote-{key}"))
            result = self.swap.handle(Commit(id=f"config-commit-{key}"))
        if self.swap.state.phase is SwapPhase.FAILED or result.outcome == "refused":
            reason = self.swap.state.last_reason if result.outcome != "refused" else result.reason
            self.refusals.append(f"bundle {path}: {reason}")
            log.error("configured bundle %s refused: %s; keeping %s %s", path, reason,
                      blue.name, blue.version)

    def serving(self) -> LoadedModel:
        loaded = self.slots[self.active]
        if loaded is None or not self._accepting:
            why = "; ".join(self.refusals[-1:]) or "no bundle installed"
            raise NotReadyError(f"no verified model is serving ({why})")
        return loaded

    @property
    def ready(self) -> bool:
        return self._accepting and self.slots[self.active] is not None

    # --- the swap runner's hands --------------------------------------------------------------

    def load_green(self, path: Path) -> None:
        """Verify, load and replay test vectors into the green slot (BundleError on failure)."""
        current = self.slots["green"]
        if current is not None and current.path == path:
            return
        loaded = load_model(path, self.trusted, self.config, self.onnx_checked)
        self._install("green", loaded, reason="staged")

    def unload_green(self) -> None:
        if self.active == "green":
            self.active = "blue"
        self.slots["green"] = None
        self.store.delete_slot("green")

    def set_active(self, slot: str) -> None:
        """Promotion and rollback: one reference assignment; requests in flight finish on the
        model they started with."""
        assert slot in SLOTS and self.slots[slot] is not None
        self.active = slot

    def set_shadow(self, on: bool) -> None:
        self._shadow = on and self.slots["green"] is not None
        if self._shadow and self._shadow_thread is None:
            self._shadow_thread = threading.Thread(target=self._shadow_loop,
                                                   name="edgefleet-shadow", daemon=True)
            self._shadow_thread.start()

    def commit_green(self) -> None:
        """Green becomes blue (idempotent: a restart may repeat it)."""
        green = self.slots["green"]
        if green is not None:
            self._install("blue", green, reason="committed")
            self.active = "blue"
            self.slots["green"] = None
        self.store.delete_slot("green")  # also after a kill between the two writes

    def health_stats(self, since: float) -> tuple[HealthStats | None, HealthStats | None]:
        """Green's evidence since ``since`` and blue's from before it (committed windows)."""
        green, blue = self.slots["green"], self.slots["blue"]
        if green is None or blue is None:
            return None, None
        start = math.floor(since / self.config.telemetry.window_seconds) * (
            self.config.telemetry.window_seconds)
        g = [w.metrics for w in self.store.windows(model_version=green.version, since=start)
             if w.model_name == green.name]
        b = [w.metrics for w in self.store.windows(model_version=blue.version)
             if w.model_name == blue.name and w.start < since][-12:]
        return stats_of(g), stats_of(b)

    # --- serving ---------------------------------------------------------------------------

    def predict(self, inputs: Any, *, key: str | None = None) -> PredictResult:
        """Serve one request: a row (mapping or 1-D array) or a batch (2-D array, columns).

        ``key`` makes the canary split sticky (the same key always goes to the same slot).
        Sketching is not on this path: the rows go to the recorder's fold queue (see
        :mod:`edge_agent.telemetry`), and a flush folds everything queued before it.
        """
        t0 = _perf_ns()
        loaded = self.slots[self.active]
        if loaded is None or not self._accepting:
            loaded = self.serving()  # raises NotReadyError with the reason
        if self._shadow:
            canary = self.config.swap.canary_fraction
            green = self.slots["green"]
            if canary > 0 and green is not None and _canary_pick(key, canary, self._rng):
                loaded = green
        validator = loaded.validator
        try:
            model_in = validator.validate(inputs)
        except InputError:
            self.recorder.record_rejected(loaded.telemetry)
            raise
        model = loaded.model
        try:
            feats = model.features(model_in)
            pred = model.run_features(feats)
        except Exception:
            self.recorder.record_error(loaded.telemetry)
            raise
        now = self.clock()
        if validator.signal:
            raw_oor, raw_empty = validator.signal_checks(model_in)
        else:
            raw_oor = raw_empty = 0
        n = len(pred)
        if n == 1:  # the common case, kept free of per-call numpy reductions
            n = 1
            probabilities = pred.probabilities
            if probabilities is not None:
                score = max(probabilities.tolist()[0])
                out = float(pred.codes[0])  # type: ignore[index]  # classifiers have codes
            else:
                score = out = float(pred.values[0])  # type: ignore[index]  # regressors values
            # bytes: an immutable copy, as the caller may reuse its input array
            row = (feats.tobytes() if type(feats) is np.ndarray
                   else loaded.telemetry.feature_rows(feats).astype(np.float32).tobytes())
            if raw_oor or raw_empty or not _isfinite(score):
                self.recorder.record_flags(loaded.telemetry, raw_oor, raw_empty,
                                           0 if _isfinite(score) else 1)
            self.recorder.record_one(loaded.telemetry, now, row, out, score,
                                     (_perf_ns() - t0) / 1000.0)
            with self._pending_lock:  # extend the run of single rows (one stored row per run)
                log = self._log
                run = log.run
                if run is None or run.loaded is not loaded:
                    run = log.run = Run(self._next_single, now, loaded)
                    log.entries.append(run)
                first = self._next_single
                self._next_single = first + 1
                run.labels.append(pred.labels[0])
                run.scores.append(score)
        elif pred.raw_labels is not None and self.recorder.fold_keeps_up():
            # codes undecoded: the fold thread decodes them, for the sketches and the log
            # entry (while it keeps up: a sustained stream of small models' batches is folded
            # slower than it is served, and then the request decodes its own, below)
            first, flush_soon = self.recorder.record_deferred(
                loaded.telemetry, now, feats, pred, (_perf_ns() - t0) / 1000.0,
                self._reserve_batch, loaded, raw_out_of_range=raw_oor, raw_empty=raw_empty)
            if flush_soon and not self._flush_soon.is_set():
                self._flush_soon.set()
        else:
            latency_us = (_perf_ns() - t0) / 1000.0
            scores = self._record_batch(loaded, feats, pred, latency_us, raw_oor, raw_empty)
            with self._pending_lock:  # a batch takes a block of ids from its own range
                first = self._next_batch_id
                self._next_batch_id += n
                # codes (or labels) and scores for the writer, copied into the log's chunks; a
                # regressor's scores are its values, its labels their text: not logged twice
                text = pred.label_text
                flush_soon = self._log.add_batch(
                    first, now, loaded, scores, pred.codes, text,
                    None if text is not None or pred.values is not None else pred.labels)
            if flush_soon and not self._flush_soon.is_set():
                self._flush_soon.set()
        if self._sample_inputs:
            self._sample(first, n, now, loaded, model_in)
        result = PredictResult(loaded.name, loaded.version, first, self.boot, pred)
        if self._shadow and loaded is self.slots["blue"]:
            try:  # off the request path: a full queue drops the shadow run, never waits
                self._shadow_queue.put_nowait((_frozen_copy(inputs), result))
            except queue.Full:
                self.recorder.record_shadow_drop(loaded.telemetry)
        return result

    def _reserve_batch(self, loaded: LoadedModel, now: float, label_text: np.ndarray,
                       scores: np.ndarray, codes: np.ndarray) -> tuple[int, bool]:
        """A block of ids and a log entry for a deferred batch, whose ``scores`` and ``codes``
        the fold fills (the recorder calls it, under its lock: see
        TelemetryRecorder.record_deferred)."""
        with self._pending_lock:
            first = self._next_batch_id
            self._next_batch_id = first + len(scores)
            flush_soon = self._log.add_deferred(first, now, loaded, scores, codes, label_text)
        return first, flush_soon

    def _record_batch(self, loaded: LoadedModel, feats: Any, pred: Prediction,
                      latency_us: float, raw_oor: int, raw_empty: int) -> np.ndarray:
        """Stage a batch's features and outputs for the fold; returns its scores (confidence
        or value)."""
        scores = _scores(pred)
        # a finite sum means every score is finite (one pass, no temporary array); only a
        # batch with a NaN or an infinity (or an overflowing sum) is counted row by row
        nonfinite = 0 if _isfinite(float(scores.sum())) else \
            len(scores) - int(np.count_nonzero(np.isfinite(scores)))
        if pred.codes is not None:
            self.recorder.record(loaded.telemetry, feats, pred.codes, scores, latency_us,
                                 raw_out_of_range=raw_oor, raw_empty=raw_empty,
                                 nonfinite=nonfinite)
        else:
            self.recorder.record(loaded.telemetry, feats, scores, None, latency_us,
                                 raw_out_of_range=raw_oor, raw_empty=raw_empty,
                                 nonfinite=nonfinite)
        return scores

    def _shadow_loop(self) -> None:
        """Run green on what blue served; record agreement and green's own telemetry."""
        while True:
            item = self._shadow_queue.get()
            try:
                if item is None:
                    return
                self._shadow_one(*item)
            finally:
                self._shadow_queue.task_done()

    def wait_shadow_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued shadow run is done (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._shadow_queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def _shadow_one(self, inputs: Any, blue_result: PredictResult) -> None:
        green = self.slots["green"]
        if green is None or not self._shadow:
            return
        try:
            t0 = time.perf_counter_ns()
            model_in = green.validator.validate(inputs)
            feats = green.model.features(model_in)
            pred = green.model.run_features(feats)
            latency_us = (time.perf_counter_ns() - t0) / 1000.0
        except Exception as err:  # a failing green is evidence, not a crash
            log.debug("shadow run failed: %s", err)
            self.recorder.record_error(green.telemetry)
            return
        self._record_batch(green, feats, pred, latency_us, 0, 0)
        self.recorder.record_agreement(green.telemetry, blue_result.prediction, pred)

    def _sample(self, first: int, n: int, now: float, loaded: LoadedModel,
                model_in: Any) -> None:
        rate = self.config.privacy.sample_rate
        picked = np.nonzero(self._rng.random(n) < rate)[0]
        for i in picked:
            if isinstance(model_in, np.ndarray):
                row: Any = [None if math.isnan(v) else float(v) for v in model_in[i]]
            else:
                row = {k: (v[i] if not isinstance(v[i], float) or not math.isnan(v[i])
                           else None) for k, v in model_in.items()}
                row = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in row.items()}
            with self._pending_lock:
                self._samples.append((f"{self.boot}-{first + int(i):x}", now, loaded.version,
                                      json.dumps(row)))

    def feedback(self, prediction_id: str, label: Any) -> dict[str, Any]:
        """Record the true outcome of an earlier prediction."""
        if not isinstance(prediction_id, str) or not prediction_id:
            raise FeedbackError(f"prediction_id {prediction_id!r}: expected a prediction id")
        self._flush_pending_predictions_only()
        row = self.store.prediction(prediction_id)
        if row is None:
            kept, oldest = self.store.prediction_horizon()
            since = "" if oldest is None else ", logged since " + time.strftime(
                "%Y-%m-%d %H:%M:%S UTC", time.gmtime(oldest))
            raise FeedbackError(
                f"prediction {prediction_id!r} is unknown, or older than the predictions kept "
                f"({kept} kept{since}; [telemetry] keep_predictions = "
                f"{self.config.telemetry.keep_predictions} sets how many)", status=404)
        with self._pending_lock:
            pending = any(f[0] == prediction_id for f in self._feedback)
        if pending or self.store.has_feedback(prediction_id):
            raise FeedbackError(f"feedback for prediction {prediction_id!r} is already recorded",
                                status=409)
        loaded = next((s for s in self.slots.values() if s is not None
                       and s.version == row["model_version"] and s.name == row["model_name"]),
                      None)
        if loaded is None:
            raise FeedbackError(
                f"prediction {prediction_id!r} was made by {row['model_name']} "
                f"{row['model_version']}, which is no longer loaded", status=410)
        tel = loaded.telemetry
        if tel.classifier:
            truth: str | float = str(label) if not isinstance(label, bool) else str(int(label))
            if truth not in tel.label_codes:
                raise FeedbackError(
                    f"label {label!r} is not one of the model's labels {list(tel.label_codes)}")
        else:
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(
                    float(label)):
                raise FeedbackError(f"label {label!r}: expected a finite number for a regressor")
            truth = float(label)
        correct, residual, drift = self.recorder.record_feedback(
            tel, row["label"], truth, row["score"])
        now = self.clock()
        with self._pending_lock:
            self._feedback.append((prediction_id, now, str(truth), row["model_version"], correct,
                                   residual))
            if drift:
                self._events.append((now, "concept_drift", {
                    "model": row["model_name"], "version": row["model_version"]}))
        return {"prediction_id": prediction_id, "correct": correct, "residual": residual,
                "concept_drift": drift}

    # --- the writer ------------------------------------------------------------------------

    def _take_pending(self) -> WriteBatch:
        # Inside the recorder's lock, with every stage holding a deferred batch queued: the
        # fold fills those batches' log entries, so the entries taken here are read only once
        # their stages are folded.
        with self.recorder.deferred_queued() as ticket, self._pending_lock:
            taken = self._log.take()
            feedback, self._feedback = self._feedback, []
            events, self._events = self._events, []
            samples, self._samples = self._samples, []
        if taken.deferred:
            self.recorder.fold_through(ticket)
        rows = prediction_rows(self.boot, taken.entries)  # copies out of the chunks
        with self._pending_lock:
            self._log.give_back(taken.chunks)
        return WriteBatch(predictions=rows, feedback=feedback, samples=samples, events=events)

    def _flush_pending_predictions_only(self) -> None:
        # Under the flush lock: a prediction the writer thread has taken but not yet committed
        # is in the database once this returns, so feedback can find it.
        with self._flush_lock:
            batch = self._take_pending()
            fb, ev = batch.feedback, batch.events
            batch.feedback, batch.events = [], []
            self.store.write(batch)
            with self._pending_lock:
                self._feedback[:0] = fb
                self._events[:0] = ev

    def flush(self, *, close_all: bool = False) -> None:
        """Commit what is pending: windows (closed and checkpoints), predictions, feedback."""
        with self._flush_lock:
            batch = self._take_pending()
            batch.windows = self.recorder.collect(close_all=close_all)
            self.store.write(batch)

    def _write_loop(self) -> None:
        interval = self.config.telemetry.flush_interval_seconds
        due = time.monotonic() + interval
        while True:
            early = self._flush_soon.wait(max(0.0, due - time.monotonic()))
            self._flush_soon.clear()
            if self._stop.is_set():
                return
            if early and time.monotonic() < due:
                # a burst filled the prediction log's chunks: write those alone (windows are
                # checkpointed at the interval, not at every burst)
                try:
                    self._flush_pending_predictions_only()
                except Exception:
                    log.exception("writer flush of the prediction log failed")
                continue
            due = time.monotonic() + interval
            try:
                self.flush()
                self.swap.check_health()
            except Exception:  # keep serving; the next flush retries what it can
                log.exception("writer flush failed")
            if self.sync is not None:
                self.sync.notify()

    def close(self) -> None:
        """Stop accepting, flush everything, close the database (SIGTERM path)."""
        self._accepting = False
        self.swap.close()  # a download in progress stops; the next start resumes it
        if self.sync is not None:  # first: it reads the store that closes below
            self.sync.stop()
        self._stop.set()
        self._flush_soon.set()
        if self._shadow_thread is not None:
            self._shadow_queue.put(None)
            self._shadow_thread.join(timeout=30)
        if self._writer is not None:
            self._writer.join(timeout=30)
        self.flush()  # folds every queued row first
        self.recorder.close()
        self.store.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        slots = {}
        for slot, loaded in self.slots.items():
            slots[slot] = None if loaded is None else {
                "name": loaded.name, "version": loaded.version, "sha256": loaded.sha256,
                "path": str(loaded.path)}
        return {"device_id": self.config.device_id, "ready": self.ready, "slots": slots,
                "active": self.active, "swap": self.swap.state.to_dict(),
                "refusals": self.refusals[-5:],
                "sync": None if self.sync is None else self.sync.status()}


def _scores(pred: Prediction) -> np.ndarray:
    """Each row's confidence (its largest probability, NaN if any is NaN) or value (the
    prediction's own array: read here, copied by whatever keeps it)."""
    p = pred.probabilities
    if p is None:
        assert pred.values is not None
        return pred.values
    return row_scores(p)


def _canary_pick(key: str | None, fraction: float, rng: np.random.Generator) -> bool:
    """Whether this request goes to green: sticky by key (a stable hash), else random."""
    if key is None:
        return bool(rng.random() < fraction)
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return bucket / 2**64 < fraction


def _frozen_copy(inputs: Any) -> Any:
    """A copy the caller cannot change under the shadow thread (callers reuse buffers)."""
    if isinstance(inputs, np.ndarray):
        return inputs.copy()
    if isinstance(inputs, dict):
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    return inputs


def _closed(row: Any) -> Any:
    from dataclasses import replace

    return replace(row, closed=True)


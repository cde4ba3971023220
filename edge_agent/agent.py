"""The agent: verified models in slots, serving, telemetry, and the writer thread.

Serving never waits on disk: :meth:`Agent.predict` validates, preprocesses (numba), runs
onnxruntime, and appends to in-memory telemetry. A writer thread commits every
``flush_interval_seconds`` (default 1 s) in one SQLite transaction with ``synchronous=FULL``:
a power cut loses at most the last interval of the open window's sketch updates and prediction
records; a committed window is never lost.

Slots: ``blue`` serves; ``green`` is the candidate slot that the swap (a later issue) fills
beside it. Both hold a :class:`LoadedModel`, so a second model loads next to the first.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.atomic import atomic_write_bytes
from edge_agent.bundle import VerifiedBundle, load_public_key, read_bundle
from edge_agent.config import AgentConfig
from edge_agent.errors import BundleError, FeedbackError, InputError, NotReadyError
from edge_agent.model import BundleModel, Prediction
from edge_agent.store import AgentStore, SlotRecord, WriteBatch
from edge_agent.telemetry import ModelTelemetry, TelemetryRecorder
from edge_agent.validation import InputValidator

__all__ = ["Agent", "LoadedModel", "PredictResult"]

log = logging.getLogger(__name__)

SLOTS = ("blue", "green")


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle, loaded and checked against its own test vectors."""

    bundle: VerifiedBundle
    model: BundleModel
    validator: InputValidator
    telemetry: ModelTelemetry
    path: Path

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def sha256(self) -> str:
        return self.bundle.manifest.model.sha256


@dataclass(slots=True)
class PredictResult:
    """Outputs of one request; ids are derived on demand (cheap for big batches)."""

    model_name: str
    model_version: str
    first_id: int
    boot: str
    labels: np.ndarray
    probabilities: np.ndarray | None
    values: np.ndarray | None

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def ids(self) -> list[str]:
        return [f"{self.boot}-{self.first_id + i:x}" for i in range(self.n)]

    @property
    def id(self) -> str:
        return f"{self.boot}-{self.first_id:x}"


def load_model(path: Path, trusted: list[Any], config: AgentConfig) -> LoadedModel:
    """Verify, load into onnxruntime and replay test vectors; BundleError on any failure."""
    bundle = read_bundle(path, trusted)
    model = BundleModel.from_bundle(bundle, intra_op_threads=config.runtime.intra_op_threads,
                                    inter_op_threads=config.runtime.inter_op_threads)
    failures = model.replay_test_vectors(bundle.manifest.test_vectors)
    if failures:
        raise BundleError(
            f"bundle {path}: {len(failures)} of {len(bundle.manifest.test_vectors)} test "
            f"vectors fail on this device; first: #{failures[0].index} {failures[0].reason}")
    m = bundle.manifest
    return LoadedModel(bundle, model, InputValidator(m.inputs, m.model.input_mode),
                       ModelTelemetry(m.name, m.version, m), path)


class Agent:
    """The device daemon's core, usable in-process: ``Agent(config).predict(row)``."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time,
                 start_writer: bool = True) -> None:
        self.config = config
        self.clock = clock
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.trusted = [load_public_key(p) for p in config.trusted_keys]
        self.store = AgentStore(config.db_path, keep_predictions=config.telemetry.keep_predictions,
                                keep_windows=config.telemetry.keep_windows)
        self.recorder = TelemetryRecorder(config.telemetry.window_seconds, clock=clock)
        self.slots: dict[str, LoadedModel | None] = dict.fromkeys(SLOTS)
        self.boot = secrets.token_hex(4)
        # Ids: "<boot>-<hex counter>". Single rows count up from 0 with an atomic counter;
        # batches take blocks from 2**48 up, under a lock.
        self._single_ids = itertools.count()
        self._next_batch_id = 1 << 48
        self._pending: collections.deque[tuple[str, int, int, float, str, str, Prediction]] = (
            collections.deque())
        self._pending_lock = threading.Lock()
        self._feedback: list[tuple[str, float, str, str, int | None, float | None]] = []
        self._events: list[tuple[float, str, dict[str, Any]]] = []
        self._samples: list[tuple[str, float, str, str]] = []
        self._rng = np.random.default_rng()
        self._stop = threading.Event()
        self._accepting = True
        self.refusals: list[str] = []
        self._load_slots()
        if config.bundle is not None:
            self._offer(config.bundle)
        blue = self.slots["blue"]
        if blue is not None:
            for row in self.store.windows(closed=False):
                if not self.recorder.restore(row):
                    self.store.write(WriteBatch(windows=[_closed(row)]))
        self._writer: threading.Thread | None = None
        if start_writer:
            self._writer = threading.Thread(target=self._write_loop, name="edgefleet-writer",
                                            daemon=True)
            self._writer.start()

    # --- slots -----------------------------------------------------------------------------

    def _install(self, slot: str, loaded: LoadedModel, reason: str) -> None:
        self.slots[slot] = loaded
        self.recorder.register(loaded.telemetry, slot)
        m = loaded.bundle.manifest
        self.store.set_slot(
            SlotRecord(slot, m.name, m.version, m.model.sha256, str(loaded.path), self.clock()),
            event=("slot_installed", {"slot": slot, "name": m.name, "version": m.version,
                                      "reason": reason}))

    def _load_slots(self) -> None:
        for slot, rec in self.store.slots().items():
            if slot not in SLOTS:
                continue
            try:
                loaded = load_model(Path(rec.path), self.trusted, self.config)
            except BundleError as err:
                self.refusals.append(str(err))
                log.error("installed %s bundle %s refused: %s", slot, rec.path, err)
                self.store.record_event("bundle_refused", {"slot": slot, "reason": str(err)})
                continue
            self.slots[slot] = loaded
            self.recorder.register(loaded.telemetry, slot)

    def _offer(self, path: Path) -> None:
        """Install the configured bundle as blue if it differs from what blue serves."""
        blue = self.slots["blue"]
        try:
            loaded = load_model(path, self.trusted, self.config)
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

    def serving(self) -> LoadedModel:
        blue = self.slots["blue"]
        if blue is None or not self._accepting:
            why = "; ".join(self.refusals[-1:]) or "no bundle installed"
            raise NotReadyError(f"no verified model is serving ({why})")
        return blue

    @property
    def ready(self) -> bool:
        return self._accepting and self.slots["blue"] is not None

    # --- serving ---------------------------------------------------------------------------

    def predict(self, inputs: Any) -> PredictResult:
        """Serve one request: a row (mapping or 1-D array) or a batch (2-D array, columns)."""
        t0 = time.perf_counter_ns()
        loaded = self.slots["blue"]
        if loaded is None or not self._accepting:
            loaded = self.serving()  # raises NotReadyError with the reason
        try:
            model_in = loaded.validator.validate(inputs)
        except InputError:
            self.recorder.record_rejected(loaded.telemetry)
            raise
        try:
            feats = loaded.model.features(model_in)
            pred = loaded.model.run_features(feats)
        except Exception:
            self.recorder.record_error(loaded.telemetry)
            raise
        tel = loaded.telemetry
        n = len(pred.labels)
        raw_oor = raw_empty = 0
        if loaded.validator.signal:
            raw_oor, raw_empty = loaded.validator.signal_checks(model_in)
        now = self.clock()
        if n == 1:  # the common case, kept free of per-call numpy reductions
            if pred.probabilities is not None:
                score = max(pred.probabilities[0].tolist())
                out = float(tel.label_codes.get(pred.labels[0], tel.other_label))
            else:
                assert pred.values is not None
                score = out = float(pred.values[0])
            # a copy: the caller may reuse its input array for the next request
            row = (feats[0].copy() if isinstance(feats, np.ndarray)
                   else tel.feature_rows(feats)[0])
            if raw_oor or raw_empty or not math.isfinite(score):
                self.recorder.record_flags(tel, raw_oor, raw_empty,
                                           0 if math.isfinite(score) else 1)
            latency_us = (time.perf_counter_ns() - t0) / 1000.0
            self.recorder.record_one(tel, now, row, out, score, latency_us)
            first = next(self._single_ids)
        else:
            if pred.probabilities is not None:
                scores = pred.probabilities.max(axis=1)
                codes = np.fromiter(
                    (tel.label_codes.get(lbl, tel.other_label) for lbl in pred.labels),
                    dtype=np.float64, count=n)
                out_rows = np.column_stack([codes, scores])
            else:
                assert pred.values is not None
                out_rows = pred.values.astype(np.float64).reshape(-1, 1)
                scores = pred.values
            nonfinite = int(n - np.isfinite(scores).sum())
            latency_us = (time.perf_counter_ns() - t0) / 1000.0
            self.recorder.record(tel, feats, out_rows, latency_us, n, raw_out_of_range=raw_oor,
                                 raw_empty=raw_empty, nonfinite=nonfinite)
            with self._pending_lock:  # a batch takes a block of ids from its own range
                first = self._next_batch_id
                self._next_batch_id += n
        # deque.append is atomic; the writer pops from the other end
        self._pending.append((self.boot, first, n, now, loaded.name, loaded.version, pred))
        if self.config.privacy.sample_inputs:
            self._sample(first, n, now, loaded, model_in)
        return PredictResult(loaded.name, loaded.version, first, self.boot, pred.labels,
                             pred.probabilities, pred.values)

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
            raise FeedbackError(
                f"prediction {prediction_id!r} is unknown (or older than the last "
                f"{self.config.telemetry.keep_predictions} predictions kept)", status=404)
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
        pending = []
        while self._pending:
            pending.append(self._pending.popleft())
        with self._pending_lock:
            feedback, self._feedback = self._feedback, []
            events, self._events = self._events, []
            samples, self._samples = self._samples, []
        preds = []
        for boot, first, n, ts, name, version, pred in pending:
            scores = (pred.probabilities.max(axis=1) if pred.probabilities is not None
                      else pred.values)
            assert scores is not None
            preds.append((boot, first, n, ts, name, version, json.dumps(pred.labels.tolist()),
                          np.asarray(scores, dtype="<f4").tobytes()))
        return WriteBatch(predictions=preds, feedback=feedback, samples=samples, events=events)

    def _flush_pending_predictions_only(self) -> None:
        batch = self._take_pending()
        fb, ev = batch.feedback, batch.events
        batch.feedback, batch.events = [], []
        self.store.write(batch)
        with self._pending_lock:
            self._feedback[:0] = fb
            self._events[:0] = ev

    def flush(self, *, close_all: bool = False) -> None:
        """Commit what is pending: windows (closed and checkpoints), predictions, feedback."""
        batch = self._take_pending()
        batch.windows = self.recorder.collect(close_all=close_all)
        self.store.write(batch)

    def _write_loop(self) -> None:
        interval = self.config.telemetry.flush_interval_seconds
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception:  # keep serving; the next flush retries what it can
                log.exception("writer flush failed")

    def close(self) -> None:
        """Stop accepting, flush everything, close the database (SIGTERM path)."""
        self._accepting = False
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        self.flush()
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
                "refusals": self.refusals[-5:]}


def _closed(row: Any) -> Any:
    from dataclasses import replace

    return replace(row, closed=True)


"""Per-window telemetry: drift sketches, input/output/software metrics, feedback.

One :class:`ModelWindow` per (tumbling window, model version). Serving only counts and copies;
sketching happens on a fold thread, off the request path:

- a single-row request appends one tuple (model, time, feature row as float32 bytes, output,
  score, latency) to a deque, without a lock; every SINGLES_DRAIN requests (and before a batch
  or a flush) they move to their windows, and each full block of BUFFER_ROWS rows of a window
  is counted and copied into the window's *stage* (:mod:`edge_agent.stage`), as one batch
  (what is left at a flush too); the request whose rows fill a stage folds the queue itself,
  once per ``stage_rows`` single requests (a tail of one slow request instead of a burst of
  slowed ones);
- a batch request is counted and copied into its window's stage, as one batch; a batch of
  integer classes (see :meth:`TelemetryRecorder.record_deferred`) is staged as the model
  answered it, label output and probabilities, and the fold decodes its codes and scores for
  the output sketch and for its prediction-log entry, while the fold keeps up;
- a full stage (``stage_rows``) goes to the fold queue, which the fold thread empties with one
  numba call per sketch (:func:`~edge_agent.sketching.fold_stage`, GIL released).
  When more than ``fold_queue_stages`` stages wait, the request that overfilled the queue
  folds the oldest stages itself (backpressure: no row is ever dropped).

Every batch is folded as its own batch, in the order it was staged, whichever thread folds it,
so the sketches are the same bits as folding each batch synchronously when it was served.

Two locks: ``_lock`` guards the windows, their counters, latency histograms and stages;
``_fold_lock`` guards the sketches and is held while a stage is folded. Stages are queued under
``_lock``, so :meth:`TelemetryRecorder.collect` (the writer), holding both, folds every row
staged or queued before it snapshots: a flush commits everything served before it, and a window
is closed only after its rows are folded. Nothing here touches the disk: ``collect`` hands the
writer thread snapshots of open windows (checkpoints) and closed windows.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.concept_drift import Adwin
from edge_agent.errors import AgentError
from edge_agent.sketching import warmup
from edge_agent.stage import Spare, Stage
from edge_agent.store import WindowRow
from edge_agent.window import ModelTelemetry, ModelWindow
from fleet_protocol.layouts import layouts_of
from fleet_protocol.residuals import RESIDUAL_LIMIT

if TYPE_CHECKING:
    from edge_agent.model import Prediction

__all__ = ["FOLD_QUEUE_STAGES", "STAGE_ROWS", "ModelTelemetry", "ModelWindow", "TelemetryRecorder",
           "layouts_of"]

log = logging.getLogger(__name__)

#: single-row requests of a window staged together, as one batch
BUFFER_ROWS = 256
#: single-row requests that wait in the deque before the request that adds the last one moves
#: them to their windows (~0.4 µs each: rarer and longer pauses keep them out of the p99)
SINGLES_DRAIN = 4 * BUFFER_ROWS
#: rows a window's stage holds at most before it goes to the fold queue; STAGE_BYTES of float32
#: features caps it for wide models (16 features: all 16384 rows, 1 MiB; 784 features: 334).
#: Each queued stage wakes the fold thread once, and a wake-up on another CPU costs the serving
#: thread ~20 µs on a 2-vCPU VM: with 4096-row stages that was 5 µs of every 1024-row batch
#: (logistic regression batches 0.70-0.73x of raw onnxruntime; 16384 rows: 0.79-0.81x).
STAGE_ROWS = 16384
STAGE_BYTES = 1 << 20
#: stages that may wait on the fold queue before a request folds the oldest one itself: slack
#: for the fold thread's scheduling jitter when it folds about as fast as serving fills stages
#: (16 features: 4 MiB of rows; a stage is larger only when one batch is)
FOLD_QUEUE_STAGES = 4


#: reserve(owner, now, label_text, scores, codes) -> (first id, flush soon): what
#: TelemetryRecorder.record_deferred asks of the prediction log, under its lock, for a batch
#: whose log entry's scores and codes the fold fills
Reserve = Callable[[Any, float, Any, np.ndarray, np.ndarray], tuple[int, bool]]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int | None:
    """Resident memory from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class TelemetryRecorder:
    """Thread-safe accumulation of windows for every model that serves or shadows.

    ``stage_rows`` is the most rows a window's stage holds (fewer for wide models, see
    STAGE_BYTES); ``fold_queue_stages`` bounds the full stages waiting for the fold thread (0: a
    full stage is folded by the request that filled it);
    ``fold_thread=False`` starts no thread, so queued rows wait for the bound, :meth:`collect`
    or :meth:`drain` (tests use it to fill the queue).
    """

    def __init__(self, window_seconds: float, *, clock: Callable[[], float] = time.time,
                 stage_rows: int = STAGE_ROWS, fold_queue_stages: int = FOLD_QUEUE_STAGES,
                 fold_thread: bool = True) -> None:
        if stage_rows < 1 or fold_queue_stages < 0:
            raise AgentError(f"stage_rows {stage_rows} and fold_queue_stages "
                             f"{fold_queue_stages}: expected stage_rows >= 1 and "
                             "fold_queue_stages >= 0")
        self.window_seconds = window_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], ModelWindow] = {}
        self._closed: list[ModelWindow] = []
        self._models: dict[tuple[str, str], tuple[ModelTelemetry, str]] = {}
        self._adwin: dict[tuple[str, str], Adwin] = {}
        #: single-row requests not in a window yet: (model, time, row, output, score, latency)
        self._singles: collections.deque[tuple[ModelTelemetry, float, bytes, float, float,
                                               float]] = collections.deque()
        # The fold queue: full stages, appended under _lock and popped under _fold_lock one at
        # a time and in order, whichever thread folds them. Rows queued and rows folded are
        # counted separately (each under its own lock): their difference is the backlog, in
        # rows; the queue's length is the backlog in stages.
        self.stage_rows = stage_rows
        self.fold_queue_stages = fold_queue_stages
        #: the rows of a stage, by its rows' width (n_in): stage_rows, or fewer if wide
        self._stage_cap: dict[int, int] = {}
        self._fold_lock = threading.Lock()
        self._jobs: collections.deque[Stage] = collections.deque()
        self._rows_queued = 0
        self._rows_folded = 0
        #: stages a request folded itself because the queue was full (under _fold_lock)
        self.inline_folds = 0
        # Folded stages' arrays, reused: a fresh 0.5 MiB array costs page faults on first touch
        # (~60 µs on a small VM), more than the copy into it. Keyed by (n_in, n_out): rows,
        # outputs, and a deferred batch's labels and probabilities.
        self._spare: dict[tuple[int, int], collections.deque[Spare]] = {}
        self._kernels_loaded = False
        self._use_thread = fold_thread
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    def register(self, model: ModelTelemetry, slot: str) -> None:
        """A model that serves from ``slot``: the sketch kernels are loaded here, before it
        serves, if they are not yet (see :meth:`_load_kernels`)."""
        self._load_kernels()
        with self._lock:
            self._models[(model.name, model.version)] = (model, slot)
            self._adwin.setdefault((model.name, model.version), Adwin())

    def _load_kernels(self) -> None:
        """Load the sketch kernels (the ahead-of-time build: ~2 ms; numba's cache: ~0.5 s,
        the GIL held in short slices; or compile them) once, when a model is registered:
        loaded by the request that staged first, they stalled every request of a busy HTTP
        server for that long (wrk's first 10 s after a start: p99 0.7-0.9 s, against 3 ms
        after). Nor on the fold thread, where the requests would wait for its slices."""
        if not self._kernels_loaded:
            warmup()
            self._kernels_loaded = True

    def _bounds(self, now: float) -> tuple[float, float]:
        start = math.floor(now / self.window_seconds) * self.window_seconds
        return start, start + self.window_seconds

    def _window(self, key: tuple[str, str], now: float) -> ModelWindow:
        win = self._open.get(key)
        if win is not None and now < win.end:
            return win
        if win is not None:
            self._closed.append(win)
        model, slot = self._models[key]
        start, end = self._bounds(now)
        win = ModelWindow.new(model, slot, start, end)
        self._open[key] = win
        return win

    def restore(self, row: WindowRow) -> bool:
        """Resume a checkpointed open window of the current period; False if it is stale."""
        key = (row.model_name, row.model_version)
        now = self.clock()
        with self._lock:
            if key not in self._models or self._bounds(now)[0] != row.start:
                return False
            with self._fold_lock:
                self._window(key, now).restore(row)
            return True

    def record(self, model: ModelTelemetry, feats: np.ndarray | dict[str, np.ndarray],
               outputs: np.ndarray, scores: np.ndarray | None, latency_us: float, *,
               raw_out_of_range: int = 0, raw_empty: int = 0, nonfinite: int = 0) -> None:
        """One served batch: its model features, outputs (label codes or values), scores
        (classifiers) and latency. The rows are copied into the window's stage here (the
        caller may reuse its arrays) and folded later, on the fold thread.
        """
        rows = model.feature_rows(feats) if not isinstance(feats, np.ndarray) else feats
        with self._lock:
            win = self._count_batch(model, self.clock(), len(outputs), latency_us,
                                    raw_out_of_range, raw_empty)
            win.nonfinite_outputs += nonfinite
            self._stage(win, rows, outputs, scores)
        self._after_staging()

    def _count_batch(self, model: ModelTelemetry, now: float, n_rows: int, latency_us: float,
                     raw_out_of_range: int, raw_empty: int) -> ModelWindow:
        """The window a batch served at ``now`` belongs to, with the batch counted in it
        (under _lock; single rows served before it are staged first)."""
        if self._singles:
            self._take_singles()
        win = self._open.get(model.key)
        if win is None or now >= win.end:
            win = self._window(model.key, now)
        win.requests += 1
        win.rows += n_rows
        if raw_out_of_range or raw_empty:
            win.raw_out_of_range += raw_out_of_range
            win.raw_empty += raw_empty
        win.latency.record(latency_us)
        return win

    def record_deferred(self, model: ModelTelemetry, now: float,
                        feats: np.ndarray | dict[str, np.ndarray], prediction: Prediction,
                        latency_us: float, reserve: Reserve, owner: Any, *,
                        raw_out_of_range: int = 0, raw_empty: int = 0) -> tuple[int, bool]:
        """One batch served at ``now`` whose codes are not decoded yet
        (``prediction.raw_labels`` and its ``decoder``, float32 ``probabilities``), as
        :meth:`record` otherwise. Its label output and probabilities are staged as they are;
        the fold decodes them into the output sketch's rows and into the batch's
        prediction-log entry: views of the stage's log arrays, which
        ``reserve(owner, now, label_text, scores, codes)`` logs here, under the window lock
        (so :meth:`deferred_queued` sees every entry with its rows). Returns what ``reserve``
        gave: the batch's first id, and whether to flush soon.

        The request saves the decode, the scores and the log's copies (~5 µs of a 1024-row
        batch, ~40 µs for a logistic regression); the fold thread does them instead, in one
        kernel call per stage.
        """
        rows = feats if type(feats) is np.ndarray else model.feature_rows(feats)
        raw, probabilities = prediction.raw_labels, prediction.probabilities
        decoder, text = prediction.decoder, prediction.label_text
        assert raw is not None and probabilities is not None and decoder is not None
        assert text is not None
        n_rows = len(raw)
        with self._lock:
            win = self._count_batch(model, now, n_rows, latency_us, raw_out_of_range,
                                    raw_empty)
            stage = win.stage
            if stage is not None and not stage.takes(decoder, len(text),
                                                     probabilities.shape[-1]):
                self._queue(stage)  # one decoder, code width and probability width a stage
                stage = win.stage = None
            if stage is None or stage.n + n_rows > stage.capacity:
                stage = self._stage_for(win, n_rows)
            log_scores, log_codes = stage.add_deferred(rows, raw, probabilities, decoder,
                                                       len(text))
            # reserved after the rows are staged: a batch that could not be staged leaves no
            # log entry for the writer to read unfilled
            first, flush_soon = reserve(owner, now, text, log_scores, log_codes)
            if stage.n == stage.capacity:
                self._queue(stage)
                win.stage = None
        if self._rows_queued != self._rows_folded:
            self._after_staging()
        return first, flush_soon

    def fold_keeps_up(self) -> bool:
        """Whether at most one stage waits for the fold: work handed to the fold thread is
        free only while it keeps up (else the request that overfills the queue folds the
        backlog itself), so a batch is deferred only then."""
        return len(self._jobs) <= 1

    @contextlib.contextmanager
    def deferred_queued(self) -> Iterator[int]:
        """Hold the window lock with every stage that holds a deferred batch queued; yields
        the fold ticket: once :meth:`fold_through` of it returns, every deferred batch recorded
        before is decoded, its log entry filled. The prediction log is taken inside: no entry
        reserved before it can wait in a stage that is not queued."""
        with self._lock:
            for win in (*self._closed, *self._open.values()):
                stage = win.stage
                if stage is not None and stage.deferred:
                    self._queue(stage)
                    win.stage = None
            yield self._rows_queued

    def fold_through(self, ticket: int) -> None:
        """Fold, on this thread, until every row queued before ``ticket`` was taken is
        folded (whichever thread folds them)."""
        while True:
            with self._fold_lock:  # a stage is popped and folded under it: none half-done
                if self._rows_folded >= ticket or not self._jobs:
                    return
                self._fold_next()

    def record_one(self, model: ModelTelemetry, now: float, row: bytes, out: float,
                   score: float, latency_us: float) -> None:
        """One single-row request, the serving fast path: one deque append, no lock; every
        SINGLES_DRAIN requests the rows go to their windows, staged BUFFER_ROWS at a time.

        ``row`` is the model features as float32 bytes (exact: they are float32 values or
        small category codes).
        """
        singles = self._singles
        singles.append((model, now, row, out, score, latency_us))
        if len(singles) >= SINGLES_DRAIN:
            with self._lock:
                queued = self._rows_queued
                self._take_singles()
                filled = self._rows_queued != queued
            if filled and self._use_thread:
                # A stage of single rows is full: fold it here (16 features: 1.2-1.4 ms on a
                # 2-vCPU VM, once per 16384 single requests, p99.99; 0.3 ms per 4096 when stages
                # were 4096 rows) rather than wake the fold thread. Woken, it folded while
                # requests went on and slowed a burst of them around each fold, measured as
                # p99 +12% on a 2-core VM (14.5-15.4 vs 12.4-13.8 µs for a logistic row).
                self._fold_until(0)
            else:
                self._after_staging()

    def _take_singles(self) -> None:
        """Move the single-row requests into their windows' buffers, and stage every full
        block of BUFFER_ROWS (caller holds _lock).

        The deque is only appended to (atomically, without the lock) and popped from the left
        under the lock, so no request is lost or taken twice.
        """
        singles = self._singles
        n = len(singles)
        if not n:
            return
        items = [singles.popleft() for _ in range(n)]
        models, nows, rows, outputs, scores, latency = zip(*items, strict=True)
        model = models[0]
        win = self._open.get(model.key)
        if win is not None and max(nows) < win.end and models.count(model) == n:
            # the common case: one model, one window, taken by column
            win.buffered_rows += rows
            win.buffered_outputs += outputs
            win.buffered_scores += scores
            win.buffered_latency += latency
            touched = {id(win): win}
        else:
            touched = {}
            for item in items:
                model, now = item[0], item[1]
                win = self._open.get(model.key)
                if win is None or now >= win.end:
                    win = self._window(model.key, now)
                touched[id(win)] = win
                win.buffered_rows.append(item[2])
                win.buffered_outputs.append(item[3])
                win.buffered_scores.append(item[4])
                win.buffered_latency.append(item[5])
        for win in touched.values():
            while len(win.buffered_rows) >= BUFFER_ROWS:
                block = win.take_buffered(BUFFER_ROWS)
                assert block is not None
                self._stage(win, *block)

    # --- staging and the fold queue ------------------------------------------------------

    def _stage(self, win: ModelWindow, rows: np.ndarray, outputs: np.ndarray,
               scores: np.ndarray | None) -> None:
        """Copy a batch into the window's stage; queue the stage once full (under _lock)."""
        stage = self._stage_for(win, len(outputs))
        stage.add(rows, outputs, scores)
        if stage.n == stage.capacity:
            self._queue(stage)
            win.stage = None

    def _stage_for(self, win: ModelWindow, n: int) -> Stage:
        """The window's stage, with room for ``n`` more rows (under _lock): a full one is
        queued and a new one started."""
        stage = win.stage
        if stage is not None and stage.n + n > stage.capacity:
            self._queue(stage)
            stage = None
        if stage is None:
            self._load_kernels()  # a recorder fed without a registered model
            stage = win.stage = self._new_stage(win, n)
        return stage

    def _capacity(self, n_in: int) -> int:
        """The rows of a stage of ``n_in`` features: stage_rows, or what fits STAGE_BYTES."""
        cap = self._stage_cap.get(n_in)
        if cap is None:
            cap = self._stage_cap[n_in] = min(self.stage_rows,
                                              max(BUFFER_ROWS, STAGE_BYTES // (4 * n_in)))
        return cap

    def _new_stage(self, win: ModelWindow, n: int) -> Stage:
        """A stage for ``win`` with room for ``n`` rows: the usual size (from the spares when
        one is free), or a batch's own size when it is larger."""
        model = win.model
        shape = (model.k_in.n_features, model.k_out.n_features)
        cap = self._capacity(shape[0])
        rows = max(n, cap)
        spare = self._spare.get(shape)
        if rows == cap and spare:
            try:
                return Stage(win, *spare.pop())
            except IndexError:  # taken by another thread since the check
                pass
        # Features as float32: the model's input tensor is float32 (BundleModel.features casts
        # to it) and category codes are small integers, so this is exact and half the bytes to
        # copy. Outputs stay float64: a model may answer in doubles (a score of 0.49999999999
        # must not round onto a bin edge of 0.5), and they are two columns.
        return Stage(win, np.empty((rows, shape[0]), dtype=np.float32),
                     np.empty((rows, shape[1]), dtype=np.float64))

    def _queue(self, stage: Stage) -> None:
        """Put a stage on the fold queue (caller holds _lock)."""
        self._rows_queued += stage.n
        self._jobs.append(stage)

    def _after_staging(self) -> None:
        """Fold the excess here if the backlog is over the bound; wake the fold thread."""
        if len(self._jobs) > self.fold_queue_stages:
            self._fold_until(self.fold_queue_stages, inline=True)
        if self._use_thread and self._rows_queued != self._rows_folded:
            if self._thread is None:
                self._start_thread()
            if not self._wake.is_set():
                self._wake.set()

    def _start_thread(self) -> None:
        with self._fold_lock:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._fold_loop, name="edgefleet-fold",
                                            daemon=True)
            self._thread.start()

    def _fold_until(self, backlog: int, *, inline: bool = False) -> None:
        """Fold the oldest stages, one at a time and in order, until at most ``backlog``
        stages wait."""
        while len(self._jobs) > backlog:
            with self._fold_lock:
                if not self._jobs:
                    return
                self._fold_next()
                if inline:
                    self.inline_folds += 1

    def _fold_next(self) -> None:
        """Fold the oldest stage (caller holds _fold_lock and has checked there is one)."""
        stage = self._jobs.popleft()
        try:
            stage.fold()
        except Exception:  # a bug, not bad input: the models' own codes are always valid
            log.exception("folding %d rows of %s %s into the sketches failed", stage.n,
                          stage.window.model.name, stage.window.model.version)
        finally:
            self._rows_folded += stage.n
        self._recycle(stage)

    def _recycle(self, stage: Stage) -> None:
        n_in = stage.rows.shape[1]
        if stage.capacity != self._capacity(n_in):
            return
        spare = self._spare.setdefault((n_in, stage.outputs.shape[1]), collections.deque())
        if len(spare) < 2 + self.fold_queue_stages:
            spare.append((stage.rows, stage.outputs, stage.labels, stage.probs))

    def _stage_buffered(self) -> None:
        """Queue every window's staged and buffered rows (caller holds _lock)."""
        self._take_singles()
        for win in (*self._closed, *self._open.values()):
            block = win.take_buffered()
            if block is not None:
                self._stage(win, *block)
            if win.stage is not None:
                self._queue(win.stage)
                win.stage = None

    def _fold_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._fold_until(0)
            if self._closing:
                return

    def drain(self) -> None:
        """Fold every queued stage now, on this thread (rows still staged stay staged)."""
        self._fold_until(0)

    def close(self) -> None:
        """Stop the fold thread, then fold what is queued (the agent has stopped serving)."""
        self._closing = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=30)
        self.drain()

    def record_flags(self, model: ModelTelemetry, raw_out_of_range: int, raw_empty: int,
                     nonfinite: int) -> None:
        """Rare per-request counts (signal rows out of range, empty rows, NaN outputs)."""
        with self._lock:
            win = self._window(model.key, self.clock())
            win.raw_out_of_range += raw_out_of_range
            win.raw_empty += raw_empty
            win.nonfinite_outputs += nonfinite

    def record_shadow_drop(self, model: ModelTelemetry) -> None:
        with self._lock:
            self._window(model.key, self.clock()).shadow_dropped += 1

    def record_agreement(self, green: ModelTelemetry, blue: Prediction,
                         candidate: Prediction) -> None:
        """Shadow evidence on green's window: |value difference| when both answer values
        (their labels, the values' text, are then never built), else label agreement."""
        blue_values, green_values = blue.values, candidate.values
        if blue_values is not None and green_values is not None:
            n = min(len(blue_values), len(green_values))
            diff = np.abs(np.asarray(blue_values[:n], dtype=np.float64)
                          - np.asarray(green_values[:n], dtype=np.float64))
            agreed = int(np.sum(diff <= 1e-6 * np.maximum(1.0, np.abs(blue_values[:n]))))
            abs_diff = float(np.nansum(diff))
        else:
            blue_labels, green_labels = blue.labels, candidate.labels
            n = min(len(blue_labels), len(green_labels))
            agreed = int(np.sum(blue_labels[:n] == green_labels[:n]))
            abs_diff = 0.0
        with self._lock:
            win = self._window(green.key, self.clock())
            win.shadow_compared += n
            win.shadow_agreed += agreed
            win.shadow_abs_diff += abs_diff

    def record_rejected(self, model: ModelTelemetry) -> None:
        """A request refused for not matching the input schema (a 4xx)."""
        with self._lock:
            self._window(model.key, self.clock()).rejected += 1

    def record_error(self, model: ModelTelemetry) -> None:
        with self._lock:
            self._window((model.name, model.version), self.clock()).errors += 1

    def record_feedback(self, model: ModelTelemetry, predicted: str, truth: str | float,
                        predicted_value: float | None) -> tuple[int | None, float | None, bool]:
        """Add one labelled outcome; returns (correct, residual, concept drift detected)."""
        key = (model.name, model.version)
        with self._lock:
            win = self._window(key, self.clock())
            win.feedback += 1
            if model.classifier:
                truth_s = str(truth)
                correct = int(truth_s == predicted)
                i, j = model.label_codes.get(truth_s), model.label_codes.get(predicted)
                if win.confusion is not None and i is not None and j is not None:
                    win.confusion[i, j] += 1
                drift = self._adwin[key].update(1.0 - correct)
                residual = None
            else:
                residual = float(truth) - float(predicted_value or 0.0)
                correct = None
                if abs(residual) <= RESIDUAL_LIMIT:  # False for NaN
                    win.residual.add(residual)
                    drift = self._adwin[key].update(abs(residual))
                else:  # the model answered NaN or inf (served and counted), or an absurd
                    # value: no error to add (it would poison the sketch and the detector)
                    residual = None
                    drift = False
            if drift:
                win.concept_drift += 1
            return correct, residual, drift

    def collect(self, *, close_all: bool = False) -> list[WindowRow]:
        """Closed windows (final) and checkpoints of the open ones, for the writer.

        Every row recorded before the call is folded first: most of them without the window
        lock (serving goes on), the rest with both locks held, so no row counted in a window
        is missing from its sketches and no window closes with rows still waiting.
        """
        with self._lock:
            self._stage_buffered()
        self._fold_until(0)
        now = self.clock()
        rss = _rss_bytes()
        with self._lock, self._fold_lock:
            self._stage_buffered()
            while self._jobs:
                self._fold_next()
            for key, win in list(self._open.items()):
                if close_all or now >= win.end:
                    self._closed.append(win)
                    del self._open[key]
            closed, self._closed = self._closed, []
            rows = [w.row(True, now, rss) for w in closed]
            rows += [w.row(False, now, rss) for w in self._open.values()]
        return rows

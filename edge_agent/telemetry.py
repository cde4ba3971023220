"""Per-window telemetry: drift sketches, input/output/software metrics, feedback.

One :class:`ModelWindow` per (tumbling window, model version). A single-row request only appends
a reference to its feature row, its output and its latency to a list (a fraction of a
microsecond); every 256 requests, or at a checkpoint, the batch is stacked and folded into the
sketches by a numba kernel and into the latency histogram by one vectorised call. Nothing here
touches the disk: :meth:`TelemetryRecorder.collect` hands the writer thread snapshots of open
windows (checkpoints) and closed windows.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.concept_drift import Adwin
from edge_agent.latency import LatencyHistogram
from edge_agent.sketching import KernelLayout, update_sketch
from edge_agent.store import WindowRow
from fleet_protocol.layouts import layouts_of
from fleet_protocol.manifest import BundleManifest
from fleet_protocol.sketch import Sketch, SketchLayout

__all__ = ["ModelTelemetry", "ModelWindow", "TelemetryRecorder", "layouts_of"]

BUFFER_ROWS = 256


@dataclass
class ModelTelemetry:
    """What stays fixed for one model version: layouts, kernels' views, label codes."""

    name: str
    version: str
    manifest: BundleManifest
    input_layout: SketchLayout = field(init=False)
    output_layout: SketchLayout = field(init=False)
    k_in: KernelLayout = field(init=False)
    k_out: KernelLayout = field(init=False)
    label_codes: dict[str, int] = field(init=False)
    other_label: int = field(init=False)
    category_codes: list[dict[str, int] | None] = field(init=False)

    def __post_init__(self) -> None:
        self.input_layout, self.output_layout = layouts_of(self.manifest)
        self.k_in = KernelLayout.from_layout(self.input_layout)
        self.k_out = KernelLayout.from_layout(self.output_layout)
        self.label_codes = {lbl: i for i, lbl in enumerate(self.manifest.labels)}
        self.other_label = len(self.label_codes)
        self.category_codes = [
            {c: i for i, c in enumerate(f.categories)} if f.kind == "categorical" else None
            for f in self.input_layout.features
        ]

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    @property
    def classifier(self) -> bool:
        return self.manifest.task == "classification"

    def feature_rows(self, feats: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Model features as float64 rows for the kernels (categories as codes)."""
        if isinstance(feats, np.ndarray):
            return feats
        cols = []
        for j, f in enumerate(self.input_layout.features):
            col = feats[f.name].reshape(-1)
            codes = self.category_codes[j]
            if codes is None:
                cols.append(col.astype(np.float64))
            else:
                other = len(codes)
                cols.append(np.array([-1.0 if v is None else float(codes.get(v, other))
                                      for v in col]))
        return np.column_stack(cols)


@dataclass
class ModelWindow:
    """The open (or just closed) window of one model version."""

    model: ModelTelemetry
    slot: str
    start: float
    end: float
    inputs: Sketch
    outputs: Sketch
    #: single-row requests not folded yet: (feature row, output code/value, score, latency us)
    pending: list[tuple[np.ndarray, float, float, float]] = field(default_factory=list)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    requests: int = 0
    rows: int = 0
    #: requests refused by input validation (they never reach the model)
    rejected: int = 0
    errors: int = 0
    nonfinite_outputs: int = 0
    raw_out_of_range: int = 0
    raw_empty: int = 0
    feedback: int = 0
    confusion: np.ndarray | None = None
    residual: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # n, sum|e|, sum e^2
    concept_drift: int = 0
    #: shadow runs of this (green) model compared with what blue answered
    shadow_compared: int = 0
    shadow_agreed: int = 0
    shadow_abs_diff: float = 0.0
    #: shadow runs dropped because the shadow queue was full (counted on blue's window)
    shadow_dropped: int = 0

    @classmethod
    def new(cls, model: ModelTelemetry, slot: str, start: float, end: float) -> ModelWindow:
        n_labels = len(model.manifest.labels)
        return cls(
            model=model, slot=slot, start=start, end=end,
            inputs=Sketch.empty(model.input_layout), outputs=Sketch.empty(model.output_layout),
            confusion=np.zeros((n_labels, n_labels), dtype=np.int64) if n_labels else None,
        )

    def fold(self) -> None:
        """Fold the buffered rows into the sketches (numba)."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        rows = np.vstack([p[0] for p in pending]).astype(np.float64, copy=False)
        update_sketch(self.inputs, self.model.k_in, rows)
        if self.model.classifier:
            outs = np.array([(p[1], p[2]) for p in pending], dtype=np.float64)
        else:
            outs = np.array([(p[1],) for p in pending], dtype=np.float64)
        update_sketch(self.outputs, self.model.k_out, outs)
        self.latency.record_many(np.array([p[3] for p in pending], dtype=np.float64))

    def metrics(self, rss_bytes: int | None) -> dict[str, Any]:
        per_feature: dict[str, dict[str, int]] = {}
        for j, f in enumerate(self.model.input_layout.features):
            counts = self.inputs.feature_counts(j)
            oor = int(counts[0] + counts[-1]) if f.kind == "numeric" else int(counts[-1])
            per_feature[f.name] = {"missing": int(self.inputs.missing[j]), "out_of_range": oor}
        out: dict[str, Any] = {
            "requests": self.requests, "rows": self.rows, "rejected": self.rejected,
            "errors": self.errors,
            "nonfinite_outputs": self.nonfinite_outputs,
            "latency_us": self.latency.to_dict(),
            "latency_p50_us": self.latency.quantile(0.5) if self.latency.count else None,
            "latency_p95_us": self.latency.quantile(0.95) if self.latency.count else None,
            "latency_p99_us": self.latency.quantile(0.99) if self.latency.count else None,
            "inputs": per_feature,
            "raw": {"out_of_range_rows": self.raw_out_of_range, "empty_rows": self.raw_empty},
            "feedback": {"count": self.feedback, "concept_drift_detections": self.concept_drift},
            "rss_bytes": rss_bytes,
            "shadow": {"compared": self.shadow_compared, "agreed": self.shadow_agreed,
                       "agreement": (self.shadow_agreed / self.shadow_compared
                                     if self.shadow_compared else None),
                       "mean_abs_diff": (self.shadow_abs_diff / self.shadow_compared
                                         if self.shadow_compared else None),
                       "dropped": self.shadow_dropped},
        }
        if self.confusion is not None:
            out["feedback"]["confusion"] = self.confusion.tolist()
            total = int(self.confusion.sum())
            out["feedback"]["accuracy"] = (float(np.trace(self.confusion)) / total
                                           if total else None)
        else:
            n, abs_sum, sq_sum = self.residual
            out["feedback"]["mae"] = abs_sum / n if n else None
            out["feedback"]["rmse"] = math.sqrt(sq_sum / n) if n else None
        return out

    def row(self, closed: bool, now: float, rss_bytes: int | None) -> WindowRow:
        self.fold()
        return WindowRow(
            start=self.start, end=self.end, model_name=self.model.name,
            model_version=self.model.version, slot=self.slot, closed=closed,
            layout=self.model.input_layout.fingerprint() + "/"
            + self.model.output_layout.fingerprint(),
            inputs=self.inputs.to_bytes(), outputs=self.outputs.to_bytes(),
            metrics=self.metrics(rss_bytes), rows=self.rows, updated_at=now,
        )

    def restore(self, row: WindowRow) -> None:
        """Continue a window a previous run checkpointed (same start and version)."""
        self.inputs += Sketch.from_bytes(self.model.input_layout, row.inputs)
        self.outputs += Sketch.from_bytes(self.model.output_layout, row.outputs)
        m = row.metrics
        self.requests += int(m.get("requests", 0))
        self.rows += int(m.get("rows", 0))
        self.errors += int(m.get("errors", 0))
        self.rejected += int(m.get("rejected", 0))
        self.nonfinite_outputs += int(m.get("nonfinite_outputs", 0))
        self.latency.merge(LatencyHistogram.from_dict(m["latency_us"]))
        raw = m.get("raw", {})
        self.raw_out_of_range += int(raw.get("out_of_range_rows", 0))
        self.raw_empty += int(raw.get("empty_rows", 0))
        sh = m.get("shadow", {})
        self.shadow_compared += int(sh.get("compared", 0))
        self.shadow_agreed += int(sh.get("agreed", 0))
        self.shadow_dropped += int(sh.get("dropped", 0))
        if sh.get("mean_abs_diff") is not None:
            self.shadow_abs_diff += float(sh["mean_abs_diff"]) * int(sh.get("compared", 0))
        fb = m.get("feedback", {})
        self.feedback += int(fb.get("count", 0))
        self.concept_drift += int(fb.get("concept_drift_detections", 0))
        if self.confusion is not None and fb.get("confusion") is not None:
            self.confusion += np.asarray(fb["confusion"], dtype=np.int64)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int | None:
    """Resident memory from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class TelemetryRecorder:
    """Thread-safe accumulation of windows for every model that serves or shadows."""

    def __init__(self, window_seconds: float, *, clock: Callable[[], float] = time.time) -> None:
        self.window_seconds = window_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], ModelWindow] = {}
        self._closed: list[ModelWindow] = []
        self._models: dict[tuple[str, str], tuple[ModelTelemetry, str]] = {}
        self._adwin: dict[tuple[str, str], Adwin] = {}

    def register(self, model: ModelTelemetry, slot: str) -> None:
        with self._lock:
            self._models[(model.name, model.version)] = (model, slot)
            self._adwin.setdefault((model.name, model.version), Adwin())

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
            self._window(key, now).restore(row)
            return True

    def record(self, model: ModelTelemetry, feats: np.ndarray | dict[str, np.ndarray],
               out_rows: np.ndarray, latency_us: float, n_rows: int, *,
               raw_out_of_range: int = 0, raw_empty: int = 0, nonfinite: int = 0) -> None:
        """One served request: its model features, output rows and latency."""
        rows = model.feature_rows(feats)
        now = self.clock()
        with self._lock:
            win = self._window((model.name, model.version), now)
            win.requests += 1
            win.rows += n_rows
            win.raw_out_of_range += raw_out_of_range
            win.raw_empty += raw_empty
            win.nonfinite_outputs += nonfinite
            win.latency.record(latency_us)
            update_sketch(win.inputs, model.k_in, np.asarray(rows, dtype=np.float64))
            update_sketch(win.outputs, model.k_out, out_rows)

    def record_one(self, model: ModelTelemetry, now: float, row: np.ndarray, out: float,
                   score: float, latency_us: float) -> None:
        """One single-row request, the serving fast path: one list append under the lock; the
        numba fold runs every BUFFER_ROWS requests."""
        with self._lock:
            win = self._open.get(model.key)
            if win is None or now >= win.end:
                win = self._window(model.key, now)
            win.requests += 1
            win.rows += 1
            win.pending.append((row, out, score, latency_us))
            if len(win.pending) >= BUFFER_ROWS:
                win.fold()

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

    def record_agreement(self, green: ModelTelemetry, blue_labels: np.ndarray,
                         blue_values: np.ndarray | None, green_labels: np.ndarray,
                         green_values: np.ndarray | None) -> None:
        """Shadow evidence on green's window: label agreement, or |value difference|."""
        n = min(len(blue_labels), len(green_labels))
        if blue_values is not None and green_values is not None:
            diff = np.abs(np.asarray(blue_values[:n], dtype=np.float64)
                          - np.asarray(green_values[:n], dtype=np.float64))
            agreed = int(np.sum(diff <= 1e-6 * np.maximum(1.0, np.abs(blue_values[:n]))))
            abs_diff = float(np.nansum(diff))
        else:
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
                win.residual[0] += 1
                win.residual[1] += abs(residual)
                win.residual[2] += residual * residual
                drift = self._adwin[key].update(abs(residual))
                correct = None
            if drift:
                win.concept_drift += 1
            return correct, residual, drift

    def collect(self, *, close_all: bool = False) -> list[WindowRow]:
        """Closed windows (final) and checkpoints of the open ones, for the writer."""
        now = self.clock()
        rss = _rss_bytes()
        with self._lock:
            for key, win in list(self._open.items()):
                if close_all or now >= win.end:
                    self._closed.append(win)
                    del self._open[key]
            closed, self._closed = self._closed, []
            rows = [w.row(True, now, rss) for w in closed]
            rows += [w.row(False, now, rss) for w in self._open.values()]
        return rows

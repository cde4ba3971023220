"""A model version's telemetry window: what it counts, its sketches, its metrics.

:class:`ModelTelemetry` is what stays fixed for one model version (layouts, the kernels' views,
label codes); :class:`ModelWindow` is one tumbling window of it: counters, the latency
histogram, the input and output sketches, feedback (a confusion matrix, or a regressor's
residual sketch) and shadow comparisons, with the metrics JSON the writer stores and the hub
receives (:meth:`ModelWindow.metrics`), and how a restart continues a checkpointed window
(:meth:`ModelWindow.restore`). How rows reach a window, and when its sketches are folded, is
:mod:`edge_agent.telemetry`'s business; the recorder's lock guards every window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.latency import LatencyHistogram
from edge_agent.sketching import KernelLayout
from edge_agent.store import WindowRow
from fleet_protocol.errors import SketchError
from fleet_protocol.layouts import layouts_of
from fleet_protocol.manifest import BundleManifest
from fleet_protocol.residuals import ResidualSketch
from fleet_protocol.sketch import Sketch, SketchLayout

if TYPE_CHECKING:
    from edge_agent.stage import Stage

__all__ = ["ModelTelemetry", "ModelWindow"]

log = logging.getLogger(__name__)


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
    #: (name, version): the recorder's key, built once (it is looked up on every request)
    key: tuple[str, str] = field(init=False)
    classifier: bool = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.name, self.version)
        self.classifier = self.manifest.task == "classification"
        self.input_layout, self.output_layout = layouts_of(self.manifest)
        self.k_in = KernelLayout.from_layout(self.input_layout)
        self.k_out = KernelLayout.from_layout(self.output_layout)
        self.label_codes = {lbl: i for i, lbl in enumerate(self.manifest.labels)}
        self.other_label = len(self.label_codes)
        self.category_codes = [
            {c: i for i, c in enumerate(f.categories)} if f.kind == "categorical" else None
            for f in self.input_layout.features
        ]

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
    #: single-row requests not staged yet (nor counted in requests, rows and latency), by
    #: column: feature rows as float32 bytes (an immutable copy, as the caller may reuse its
    #: array, and cheap to join), output codes or values, scores, latencies in µs
    buffered_rows: list[bytes] = field(default_factory=list)
    buffered_outputs: list[float] = field(default_factory=list)
    buffered_scores: list[float] = field(default_factory=list)
    buffered_latency: list[float] = field(default_factory=list)
    #: rows copied here and not queued for the fold yet (None: nothing staged)
    stage: Stage | None = None
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    requests: int = 0
    rows: int = 0
    #: requests refused by input validation (they never reach the model)
    rejected: int = 0
    errors: int = 0
    nonfinite_outputs: int = 0
    #: non-finite scores of batches whose outputs the fold decodes (written under the fold
    #: lock, as the fold counts them; reported with nonfinite_outputs)
    folded_nonfinite: int = 0
    raw_out_of_range: int = 0
    raw_empty: int = 0
    feedback: int = 0
    confusion: np.ndarray | None = None
    #: a regressor's feedback: the residuals truth - prediction (MAE, RMSE, bias, quantiles)
    residual: ResidualSketch = field(default_factory=ResidualSketch)
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

    def take_buffered(self, limit: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """The first ``limit`` (default all) buffered single rows as one batch (float32 rows,
        outputs, scores or None), now counted (requests, rows, latency) and out of the buffer;
        None when nothing is buffered."""
        n = len(self.buffered_rows) if limit is None else min(limit, len(self.buffered_rows))
        if not n:
            return None
        rows, self.buffered_rows = self.buffered_rows[:n], self.buffered_rows[n:]
        outputs, self.buffered_outputs = self.buffered_outputs[:n], self.buffered_outputs[n:]
        scores, self.buffered_scores = self.buffered_scores[:n], self.buffered_scores[n:]
        latency, self.buffered_latency = self.buffered_latency[:n], self.buffered_latency[n:]
        self.requests += n
        self.rows += n
        self.latency.record_many(np.array(latency, dtype=np.float64))
        return (np.frombuffer(b"".join(rows), dtype=np.float32).reshape(n, -1),
                np.array(outputs, dtype=np.float64),
                np.array(scores, dtype=np.float64) if self.model.classifier else None)

    def metrics(self, rss_bytes: int | None) -> dict[str, Any]:
        """The window's counters as the stored and sent JSON. Per-feature missing and
        out-of-range counts are not repeated here: the input sketch holds them (its missing
        counts, its underflow and overflow slots), and the drift tables read them from it
        (fleet_protocol.verdict); sent on every window, they were ~100 B of each message."""
        out: dict[str, Any] = {
            "requests": self.requests, "rows": self.rows, "rejected": self.rejected,
            "errors": self.errors,
            "nonfinite_outputs": self.nonfinite_outputs + self.folded_nonfinite,
            "latency_us": self.latency.to_dict(),
            "latency_p50_us": self.latency.quantile(0.5) if self.latency.count else None,
            "latency_p95_us": self.latency.quantile(0.95) if self.latency.count else None,
            "latency_p99_us": self.latency.quantile(0.99) if self.latency.count else None,
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
            out["feedback"].update(self.residual.summary())
            out["feedback"]["residuals"] = self.residual.to_dict()
        return out

    def row(self, closed: bool, now: float, rss_bytes: int | None) -> WindowRow:
        """The window as the writer stores it; every fold job of it must have been folded."""
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
        if fb.get("residuals") is not None:
            try:
                self.residual += ResidualSketch.from_dict(fb["residuals"])
            except SketchError as err:  # the rest of the checkpoint still counts
                log.warning("window %s %s from %s: its residual sketch is not restored: %s",
                            self.model.name, self.model.version, self.start, err)

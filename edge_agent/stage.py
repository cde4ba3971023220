"""A stage: rows of one telemetry window copied off the request path, waiting for the fold.

:class:`~edge_agent.telemetry.TelemetryRecorder` copies each served batch (or a block of
buffered single rows) into its window's stage; a full stage goes to the fold queue, and the fold
thread (or a request, when the queue is over its bound) folds it into the window's sketches with
one kernel call per sketch. Every batch is folded as its own batch, in the order it was staged,
so the sketches are the bits of folding each batch when it was served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.prediction_log import code_dtype
from edge_agent.sketching import decode_deferred, fold_stage

if TYPE_CHECKING:
    from edge_agent.model import CodeTable
    from edge_agent.window import ModelWindow

__all__ = ["Spare", "Stage"]

#: a recycled stage's arrays: feature rows, output rows, raw labels and probabilities
Spare = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


class Stage:
    """Rows of one window staged for the fold, in arrival order: float32 feature rows, float64
    output rows, and where each batch ends (each request's batch, or a block of buffered single
    rows, is folded as its own batch: the same bits as folding it when it arrived).

    A *deferred* batch (:meth:`add_deferred`) is staged as the model gave its outputs: the
    label output (int64) and the float32 probabilities. The fold decodes them into the output
    rows (code, score) and into the batch's prediction-log entry, which is a view of the
    stage's own ``log_scores`` and ``log_codes`` (made for the stage's first deferred batch,
    never reused: the entry outlives the stage): the request waits for neither. One kernel
    call decodes every deferred batch of the stage (:func:`~edge_agent.sketching.
    decode_deferred`), without the GIL.
    """

    __slots__ = ("capacity", "code_dtype", "decoder", "deferred", "ends", "labels", "log_codes",
                 "log_scores", "n", "outputs", "probs", "rows", "window")

    def __init__(self, window: ModelWindow, rows: np.ndarray, outputs: np.ndarray,
                 labels: np.ndarray | None = None, probs: np.ndarray | None = None) -> None:
        self.window = window
        self.rows = rows
        self.outputs = outputs
        #: rows it holds
        self.capacity = int(rows.shape[0])
        self.n = 0
        self.ends: list[int] = []
        #: raw label outputs and probabilities of deferred batches (allocated on first use)
        self.labels = labels
        self.probs = probs
        #: deferred batches: [start, end) of each
        self.deferred: list[tuple[int, int]] = []
        #: what decodes the deferred batches' label outputs, and the log's code dtype
        self.decoder: CodeTable | None = None
        self.code_dtype: np.dtype[Any] | None = None
        self.log_scores: np.ndarray | None = None
        self.log_codes: np.ndarray | None = None

    def add(self, rows: np.ndarray, outputs: np.ndarray, scores: np.ndarray | None) -> None:
        """Copy a batch in (the copy is what makes it safe to fold on another thread)."""
        a = self.n
        b = a + len(outputs)
        self.rows[a:b] = rows
        self.outputs[a:b, 0] = outputs
        if scores is not None:
            self.outputs[a:b, 1] = scores
        self.n = b
        self.ends.append(b)

    def takes(self, decoder: CodeTable, n_text: int, n_classes: int) -> bool:
        """Whether a deferred batch of ``decoder`` into ``n_text`` labels, with ``n_classes``
        probability columns, may join the stage's deferred batches (one decoder, one log code
        dtype and one probability width a stage)."""
        if self.decoder is None:
            return True
        return (decoder is self.decoder and code_dtype(n_text) == self.code_dtype
                and self.probs is not None and self.probs.shape[1] == n_classes)

    def add_deferred(self, rows: np.ndarray, raw_labels: np.ndarray, probabilities: np.ndarray,
                     decoder: CodeTable, n_text: int) -> tuple[np.ndarray, np.ndarray]:
        """Copy a batch in with its outputs undecoded (the caller checked :meth:`takes`);
        returns its prediction-log entry's scores (float32) and codes (into ``n_text``
        labels), which the fold fills.

        The decoding kernel reads and writes without bounds checks: every shape it relies on
        is checked here (ValueError, nothing staged), so a malformed bundle fails a request
        instead of writing past an array."""
        a = self.n
        b = a + len(raw_labels)
        if (raw_labels.ndim != 1 or probabilities.ndim != 2 or len(probabilities) != b - a
                or probabilities.shape[1] < 1 or self.outputs.shape[1] != 2
                or b > self.capacity):
            raise ValueError(
                f"a deferred batch of {raw_labels.shape} labels and {probabilities.shape} "
                f"probabilities does not fit a stage of {self.outputs.shape} outputs with "
                f"{self.capacity - a} rows free: expected n labels, (n, k >= 1) probabilities "
                "and two output columns (code, score)")
        labels, probs = self.labels, self.probs
        if labels is None:
            labels = self.labels = np.empty(self.capacity, dtype=np.int64)
        if probs is None or probs.shape[1] != probabilities.shape[1]:
            assert not self.deferred, "takes() keeps one probability width a stage"
            probs = self.probs = np.empty((self.capacity, probabilities.shape[1]),
                                          dtype=np.float32)
        self.rows[a:b] = rows
        labels[a:b] = raw_labels
        probs[a:b] = probabilities
        log_scores, log_codes, cdt = self.log_scores, self.log_codes, self.code_dtype
        if log_scores is None or log_codes is None or cdt is None:
            cdt = self.code_dtype = code_dtype(n_text)
            # little-endian, as the log stores them (prediction_log's chunks): the kernel's
            # float32 on every device this runs on
            log_scores = self.log_scores = np.empty(self.capacity, dtype="<f4")
            log_codes = self.log_codes = np.empty(self.capacity * cdt.itemsize, dtype=np.uint8)
            self.decoder = decoder
        self.n = b
        self.ends.append(b)
        self.deferred.append((a, b))
        size = cdt.itemsize
        return log_scores[a:b], log_codes[a * size:b * size].view(cdt)

    def decode_deferred(self) -> int:
        """Decode every deferred batch into the output rows and its log entry; the number of
        non-finite scores among them."""
        decoder, cdt = self.decoder, self.code_dtype
        assert self.labels is not None and self.probs is not None and decoder is not None
        assert self.log_scores is not None and self.log_codes is not None and cdt is not None
        try:
            return decode_deferred(self.labels, self.probs, decoder.codes, decoder.shift,
                                   np.array(self.deferred, dtype=np.int64), self.outputs,
                                   self.log_scores, self.log_codes, cdt.itemsize)
        except BaseException:  # a bug: the log entries say "unknown", never stale bytes
            codes = self.log_codes.view(cdt)
            for a, b in self.deferred:
                codes[a:b] = decoder.codes[0]
                self.log_scores[a:b] = np.nan
            raise

    def fold(self) -> None:
        """Fold every staged batch into the window's sketches (caller holds the fold lock)."""
        win = self.window
        n = self.n
        if self.deferred:
            bad = self.decode_deferred()
            if bad:
                win.folded_nonfinite += bad
        ends = np.array(self.ends, dtype=np.int64)  # increasing, the last is n: as built
        fold_stage(win.inputs, win.model.k_in, self.rows[:n], ends)
        fold_stage(win.outputs, win.model.k_out, self.outputs[:n], ends)

"""Served requests waiting for the writer: what the prediction log will hold.

Every request gets its ids at once and is logged by the writer thread on its next flush (see
:mod:`edge_agent.agent`): one stored row per run of consecutive single-row requests, one per
batch. A batch of integer classes is logged by its label codes (1, 2 or 4 bytes a row, by the
size of the label set) and float32 scores.

Those bytes are copied, narrowed, into reused 512 KiB chunks rather than held in the request's
own arrays. Holding a 1024-row batch's int64 codes and float64 scores until the flush meant
16 KiB of fresh memory per request, returned to the system at each flush and faulted in again:
~4 minor page faults per request, 15-20 µs of a ~60 µs logistic inference on this VM. The
chunks go back to a free list once the writer has read them, so a busy agent reuses the same
pages. When more than :data:`FLUSH_SOON_CHUNKS` chunks wait, the log asks for an early flush:
the memory a burst of batches holds is bounded, not one flush interval of whatever arrives.
A batch whose codes the fold decodes (:meth:`PendingLog.add_deferred`) is logged in its
telemetry stage's own arrays instead, which the fold fills; their bytes count toward the same
bound.

Not thread-safe on its own: the agent calls it under its ``_pending_lock``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from edge_agent.store import PredictionRow

if TYPE_CHECKING:
    from edge_agent.agent import LoadedModel

__all__ = ["CHUNK_BYTES", "FLUSH_SOON_CHUNKS", "MAX_ROW_PREDICTIONS", "PendingLog",
           "PredictionRow", "Run", "TakenLog", "code_dtype", "prediction_rows"]

CHUNK_BYTES = 1 << 19
#: chunks in use past which the log asks the writer to flush now (8 MiB)
FLUSH_SOON_CHUNKS = 16
#: free chunks kept for reuse (more are dropped: a burst's memory goes back); more than
#: FLUSH_SOON_CHUNKS, as serving fills new chunks while the writer reads the ones it took
KEEP_FREE_CHUNKS = 24
_ALIGN = 8



_U1, _U2, _U4, _F4 = np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<f4")


def code_dtype(n_text: int) -> np.dtype[Any]:
    """The narrowest little-endian unsigned dtype for codes into ``n_text`` label texts."""
    return _U1 if n_text <= 256 else _U2 if n_text <= 65536 else _U4


class Run:
    """Consecutive single-row requests of one model (ids first..first+n-1), awaiting the writer
    as one stored row: serving appends a label and a score, the writer takes whole runs."""

    __slots__ = ("first", "labels", "loaded", "scores", "ts")

    def __init__(self, first: int, ts: float, loaded: LoadedModel) -> None:
        self.first = first
        self.ts = ts
        self.loaded = loaded
        self.labels: list[str] = []
        self.scores: list[float] = []


class _Batch:
    """One served batch: its scores (float32) and either its codes with their label texts or
    its labels; the arrays are views into a chunk (or the labels the request made)."""

    __slots__ = ("codes", "first", "label_text", "labels", "loaded", "scores", "ts")

    def __init__(self, first: int, ts: float, loaded: LoadedModel, scores: np.ndarray,
                 codes: np.ndarray | None, label_text: np.ndarray | None,
                 labels: np.ndarray | None) -> None:
        self.first = first
        self.ts = ts
        self.loaded = loaded
        self.scores = scores
        self.codes = codes
        self.label_text = label_text
        self.labels = labels


@dataclass(frozen=True)
class TakenLog:
    """What the writer took: the entries, and the chunks to give back once they are read."""

    entries: list[Run | _Batch]
    chunks: list[np.ndarray]
    #: entries of deferred batches (:meth:`PendingLog.add_deferred`) among them
    deferred: int = 0


class PendingLog:
    """The entries awaiting the writer, in serving order, and the chunks batches write into."""

    def __init__(self) -> None:
        self.entries: list[Run | _Batch] = []
        #: the run single rows extend (None: the next single row starts one)
        self.run: Run | None = None
        self._chunk: np.ndarray | None = None
        self._used = 0
        self._chunks: list[np.ndarray] = []
        self._free: list[np.ndarray] = []
        #: entries of deferred batches since the last take (their codes and scores filled by
        #: the fold), and the bytes of those
        self._deferred = 0
        self._deferred_bytes = 0

    @property
    def chunks_in_use(self) -> int:
        return len(self._chunks)

    def add_batch(self, first: int, ts: float, loaded: LoadedModel, scores: np.ndarray,
                  codes: np.ndarray | None, label_text: np.ndarray | None,
                  labels: np.ndarray | None) -> bool:
        """Log a batch: ``scores`` (any float dtype, stored as float32) and, for integer
        classes, ``codes`` into ``label_text``; else ``labels`` (None for a regressor: its
        scores are its float32 values, and a value's label is their text). The arrays are
        copied.
        Returns whether the writer should flush now (the chunks in use reached
        FLUSH_SOON_CHUNKS)."""
        n = len(scores)
        score_bytes = -(-4 * n // _ALIGN) * _ALIGN
        if codes is None or label_text is None:
            s = self._space(score_bytes)[:4 * n].view(_F4)
            np.copyto(s, scores, casting="same_kind")
            self.entries.append(_Batch(first, ts, loaded, s, None, None, labels))
        else:
            s, c = self._coded(first, ts, loaded, n, label_text)
            np.copyto(s, scores, casting="same_kind")
            np.copyto(c, codes, casting="unsafe")  # codes < len(label_text): they fit
        self.run = None
        return self._flush_soon()

    def _flush_soon(self) -> bool:
        """Whether the chunks in use and the deferred entries' bytes reach the bound."""
        return (len(self._chunks) * CHUNK_BYTES + self._deferred_bytes
                >= FLUSH_SOON_CHUNKS * CHUNK_BYTES)

    def add_deferred(self, first: int, ts: float, loaded: LoadedModel, scores: np.ndarray,
                     codes: np.ndarray, label_text: np.ndarray) -> bool:
        """Log a batch of integer classes whose float32 ``scores`` and narrowed ``codes`` (into
        ``label_text``) are not filled yet: the fold fills them (they are views of its stage,
        see :meth:`edge_agent.telemetry.TelemetryRecorder.record_deferred`) before the writer
        reads them. Returns whether the writer should flush now, as :meth:`add_batch` (the
        stages' log arrays the pending entries hold count with the chunks)."""
        self.entries.append(_Batch(first, ts, loaded, scores, codes, label_text, None))
        self.run = None
        self._deferred += 1
        self._deferred_bytes += scores.nbytes + codes.nbytes
        return self._flush_soon()

    def _coded(self, first: int, ts: float, loaded: LoadedModel, n: int,
               label_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch entry logged by codes into ``label_text``: its float32 scores and narrowed
        codes, carved from the chunks, not filled."""
        score_bytes = -(-4 * n // _ALIGN) * _ALIGN
        cdt = code_dtype(len(label_text))
        buf = self._space(score_bytes + cdt.itemsize * n)
        s = buf[:4 * n].view(_F4)
        c = buf[score_bytes:score_bytes + cdt.itemsize * n].view(cdt)
        self.entries.append(_Batch(first, ts, loaded, s, c, label_text, None))
        return s, c

    def _space(self, need: int) -> np.ndarray:
        """``need`` bytes, 8-aligned, in the current chunk, a free one or a new one."""
        need = -(-need // _ALIGN) * _ALIGN
        if need > CHUNK_BYTES:  # a huge batch: its own block, not kept for reuse
            block = np.empty(need, dtype=np.uint8)
            self._chunks.append(block)
            return block
        chunk = self._chunk
        if chunk is None or self._used + need > CHUNK_BYTES:
            chunk = self._chunk = self._free.pop() if self._free else np.empty(CHUNK_BYTES,
                                                                                 np.uint8)
            self._chunks.append(chunk)
            self._used = 0
        start = self._used
        self._used = start + need
        return chunk[start:start + need]

    def take(self) -> TakenLog:
        """Everything pending, for the writer; the next batch starts a new chunk (the writer
        reads these ones outside the lock)."""
        taken = TakenLog(self.entries, self._chunks, self._deferred)
        self.entries, self._chunks = [], []
        self._deferred = self._deferred_bytes = 0
        self.run = self._chunk = None
        self._used = 0
        return taken

    def give_back(self, chunks: list[np.ndarray]) -> None:
        """Chunks the writer has read, for reuse (at most KEEP_FREE_CHUNKS kept)."""
        for chunk in chunks:
            if chunk.size == CHUNK_BYTES and len(self._free) < KEEP_FREE_CHUNKS:
                self._free.append(chunk)


#: predictions one stored row may hold when consecutive batches are logged together
MAX_ROW_PREDICTIONS = 65_536


def prediction_rows(boot: str, entries: list[Run | _Batch]) -> list[PredictionRow]:
    """The stored rows for ``entries``: one per run of consecutive single-row requests (ids
    first..first+n-1 of one model), and one per stretch of consecutive batches of one model
    (their ids are contiguous: a batch takes the next block), up to MAX_ROW_PREDICTIONS each.

    A busy agent serving 1024-row batches makes thousands a second; one insert each kept the
    writer busy (and trading the GIL with serving) for what is a few large rows. A stretch
    carries the time of its first batch, as a run does of its first request. A batch served by
    its codes is logged by them (see AgentStore's m006): ~1 µs of the writer's GIL time,
    against ~15 µs to build and encode its 1,024 label strings."""
    rows: list[PredictionRow] = []
    label_sets: dict[int, str] = {}
    i, n_entries = 0, len(entries)
    while i < n_entries:
        p = entries[i]
        i += 1
        if isinstance(p, Run):
            rows.append((boot, p.first, len(p.labels), p.ts, p.loaded.name, p.loaded.version,
                         _json_text(p.labels), np.asarray(p.scores, dtype="<f4").tobytes(),
                         None, None))
            continue
        stretch = [p]
        total = len(p.scores)
        while i < n_entries:
            q = entries[i]
            if (isinstance(q, Run) or q.loaded is not p.loaded or q.label_text is not p.label_text
                    or (q.codes is None) != (p.codes is None)
                    or (q.labels is None) != (p.labels is None) or q.first != p.first + total
                    or total + len(q.scores) > MAX_ROW_PREDICTIONS):
                break
            stretch.append(q)
            total += len(q.scores)
            i += 1
        scores = b"".join([b.scores.data for b in stretch])
        text = p.label_text
        if p.codes is not None and text is not None:
            label_set = label_sets.get(id(text))
            if label_set is None:
                label_set = label_sets[id(text)] = _json_text(text.tolist())
            codes = b"".join([b.codes.data for b in stretch if b.codes is not None])
            rows.append((boot, p.first, total, p.ts, p.loaded.name, p.loaded.version, None,
                         scores, codes, label_set))
        elif p.labels is None:  # a regressor's: its labels are the text of its scores
            rows.append((boot, p.first, total, p.ts, p.loaded.name, p.loaded.version, None,
                         scores, None, None))
        else:
            labels: list[str] = []
            for b in stretch:
                assert b.labels is not None
                labels += b.labels.tolist()
            rows.append((boot, p.first, total, p.ts, p.loaded.name, p.loaded.version,
                         _json_text(labels), scores, None, None))
    return rows


def _json_text(labels: list[str]) -> str:
    """A list of labels as JSON text: orjson, ~6x faster than json.dumps on a 1024-row batch
    (the writer holds the GIL meanwhile, so serving waits for it)."""
    return orjson.dumps(labels).decode()

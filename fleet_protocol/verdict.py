"""Drift verdicts: a window's sketch against the bundle's calibrated baseline.

Gates use effect sizes (PSI, Jensen–Shannon distance) with thresholds the compiler calibrated per
window size, never bare p-values, which alarm on every large window (FIELD-NOTES: Evidently #50).
A window with fewer rows than the baseline's ``min_evidence`` gets ``insufficient`` — "not enough
data" is neither pass nor fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fleet_protocol.drift import js_distance, psi
from fleet_protocol.manifest import DriftThresholds, FeatureBaseline

__all__ = ["QUALITY_NOTE", "STATUS_TEXT", "FeatureVerdict", "format_rate", "judge_feature",
           "threshold_at", "verdict_lines"]

Status = Literal["insufficient", "ok", "drift"]


def threshold_at(thresholds: DriftThresholds, n: int, stat: Literal["psi", "js"]) -> float:
    """The alarm threshold for a window of `n` rows: linear in log(threshold) vs log(n).

    Clamped at the calibrated ends: below the smallest size the smallest size's (larger)
    threshold, above the largest size the largest size's — both conservative directions.
    """
    sizes = np.log(np.asarray(thresholds.window_sizes, dtype=np.float64))
    values = np.asarray(getattr(thresholds, stat), dtype=np.float64)
    logv = np.log(np.maximum(values, 1e-12))
    x = math.log(max(n, 1))
    return float(np.exp(np.interp(x, sizes, logv)))


@dataclass(frozen=True)
class FeatureVerdict:
    """One feature's drift verdict, and the data-quality counts beside it.

    ``rows`` counts the values the feature had (the ones drift is judged on); ``missing`` the
    rows where it had none (NaN, empty); ``out_of_range`` those of ``rows`` outside what
    training saw: below its minimum or above its maximum (the sketch's underflow and overflow
    slots), or, for a categorical feature, a category outside the bundle's vocabulary (its
    "other" slot) — in both cases beyond the share training itself had there. Training has
    none below its minimum or above its maximum, but a high-cardinality feature's "other"
    holds the rare categories training saw beyond the 64 the vocabulary keeps: a window with
    training's own share of them is not outside, a window where new categories came is. A
    broken sensor shows here before it shows as drift.
    """

    name: str
    status: Status
    rows: int
    psi: float | None
    js: float | None
    psi_threshold: float
    js_threshold: float
    missing: int = 0
    out_of_range: int = 0

    @property
    def drifted(self) -> bool:
        return self.status == "drift"

    @property
    def missing_rate(self) -> float | None:
        """Share of all rows (with a value or not) that had no value; None with no rows."""
        total = self.rows + self.missing
        return self.missing / total if total else None

    @property
    def out_of_range_rate(self) -> float | None:
        """Share of the rows with a value that lay outside the training range; None with none."""
        return self.out_of_range / self.rows if self.rows else None


def judge_feature(baseline: FeatureBaseline, counts: np.ndarray, min_evidence: int,
                  missing: int = 0) -> FeatureVerdict:
    """Compare one feature's window counts (same slots as the baseline) with the baseline;
    ``missing``: the sketch's missing count of the feature, reported beside the verdict.

    The feature drifts when PSI or JS distance exceeds its threshold at this window size.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    outside = _beyond_training(baseline, counts, n)
    psi_thr = threshold_at(baseline.thresholds, n, "psi")
    js_thr = threshold_at(baseline.thresholds, n, "js")
    if n < min_evidence:
        return FeatureVerdict(baseline.name, "insufficient", n, None, None, psi_thr, js_thr,
                              int(missing), outside)
    expected = np.asarray(baseline.counts, dtype=np.int64)
    p = psi(expected, counts)
    j = js_distance(expected, counts)
    status: Status = "drift" if (p > psi_thr or j > js_thr) else "ok"
    return FeatureVerdict(baseline.name, status, n, p, j, psi_thr, js_thr, int(missing),
                          outside)


def _beyond_training(baseline: FeatureBaseline, counts: np.ndarray, n: int) -> int:
    """The rows in the outside slots (underflow and overflow; a category's "other") beyond
    training's own share of them, rounded; never negative."""
    slots = [0, -1] if baseline.kind == "numeric" else [-1]
    live = int(counts[slots].sum())
    trained = np.asarray(baseline.counts, dtype=np.int64)
    total = int(trained.sum())
    share = int(trained[slots].sum()) / total if total else 0.0
    return max(0, math.floor(live - n * share + 0.5))


#: how the drift tables print a status
STATUS_TEXT: dict[str, str] = {"drift": "DRIFT", "ok": "ok", "insufficient": "not enough data"}
#: what the drift tables' two data-quality columns mean
QUALITY_NOTE = ("missing: rows without a value; outside: values beyond the training range "
                "(below its minimum, above its maximum, or a category outside the vocabulary, "
                "beyond training's own share of it)")


def format_rate(rate: float | None) -> str:
    """A share as the drift tables print it: ``-`` (no rows), ``0``, ``<0.1%``, ``12.5%``,
    ``>99.9%``, ``100%``: a rare fault never prints as 0, a nearly dead sensor never as 100%."""
    if rate is None:
        return "-"
    if rate == 0:
        return "0"
    if rate == 1:
        return "100%"
    if rate < 0.001:
        return "<0.1%"
    return ">99.9%" if rate > 0.999 else f"{rate:.1%}"


def verdict_lines(verdicts: Sequence[FeatureVerdict], rows_width: int = 8) -> list[str]:
    """The per-feature block of a drift table (the agent's ``agent drift``, the hub's ``fleet
    drift``): a header, one line per verdict, how many drifted, and what the data-quality
    columns mean. ``rows_width``: the rows column's width (a fleet's counts are longer)."""
    lines = [f"{'feature':<22} {'rows':>{rows_width}} {'missing':>7} {'outside':>7} "
             f"{'psi':>8} {'limit':>8} {'js':>8} {'limit':>8}  verdict"]
    lines += [f"{v.name[:22]:<22} {v.rows:>{rows_width}} {format_rate(v.missing_rate):>7} "
              f"{format_rate(v.out_of_range_rate):>7} {_num(v.psi):>8} {v.psi_threshold:>8.4f} "
              f"{_num(v.js):>8} {v.js_threshold:>8.4f}  {STATUS_TEXT[v.status]}"
              for v in verdicts]
    drifted = [v.name for v in verdicts if v.drifted]
    lines.append(f"{len(drifted)} of {len(verdicts)} drifted"
                 + (f": {', '.join(drifted)}" if drifted else ""))
    lines.append(QUALITY_NOTE)
    return lines


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"

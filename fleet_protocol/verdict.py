"""Drift verdicts: a window's sketch against the bundle's calibrated baseline.

Gates use effect sizes (PSI, Jensen–Shannon distance) with thresholds the compiler calibrated per
window size, never bare p-values, which alarm on every large window (FIELD-NOTES: Evidently #50).
A window with fewer rows than the baseline's ``min_evidence`` gets ``insufficient`` — "not enough
data" is neither pass nor fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fleet_protocol.drift import js_distance, psi
from fleet_protocol.manifest import DriftThresholds, FeatureBaseline

__all__ = ["FeatureVerdict", "judge_feature", "threshold_at"]

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
    name: str
    status: Status
    rows: int
    psi: float | None
    js: float | None
    psi_threshold: float
    js_threshold: float

    @property
    def drifted(self) -> bool:
        return self.status == "drift"


def judge_feature(baseline: FeatureBaseline, counts: np.ndarray,
                  min_evidence: int) -> FeatureVerdict:
    """Compare one feature's window counts (same slots as the baseline) with the baseline.

    The feature drifts when PSI or JS distance exceeds its threshold at this window size.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    psi_thr = threshold_at(baseline.thresholds, n, "psi")
    js_thr = threshold_at(baseline.thresholds, n, "js")
    if n < min_evidence:
        return FeatureVerdict(baseline.name, "insufficient", n, None, None, psi_thr, js_thr)
    expected = np.asarray(baseline.counts, dtype=np.int64)
    p = psi(expected, counts)
    j = js_distance(expected, counts)
    status: Status = "drift" if (p > psi_thr or j > js_thr) else "ok"
    return FeatureVerdict(baseline.name, status, n, p, j, psi_thr, js_thr)

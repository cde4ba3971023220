"""The parity gate: the original pipeline against the bundle's device path on the holdout.

Classifiers compare probabilities (absolute difference) and labels. float32 (onnxruntime) and
float64 (scikit-learn) arithmetic can flip the label of a row whose top two scores are within
the tolerance of each other: such a row is a *boundary tie*, counted and reported but not a
failure. Any other label flip fails the gate. Regressors compare values relative to
max(1, |reference|), so a model predicting prices in the 1e5s is held to float32's precision
rather than to an absolute 1e-4 it cannot reach.

Both sides see the same float32 inputs (the device receives float32), so the gate measures the
conversion and not the rounding of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.model import Prediction
from fleet_protocol.manifest import ParityReport, ParityRow

__all__ = ["ReferenceOutputs", "parity_report"]

WORST_ROWS = 5


@dataclass(frozen=True)
class ReferenceOutputs:
    """What scikit-learn answered on the holdout."""

    labels: np.ndarray  # str
    probabilities: np.ndarray | None
    values: np.ndarray | None


def _top_gap(proba: np.ndarray) -> np.ndarray:
    if proba.shape[1] < 2:
        return np.full(proba.shape[0], np.inf)
    part = np.sort(proba, axis=1)
    return part[:, -1] - part[:, -2]


def parity_report(reference: ReferenceOutputs, bundle: Prediction,
                  tolerance: float) -> ParityReport:
    n = len(reference.labels)
    if reference.probabilities is not None and bundle.probabilities is not None:
        ref_p = np.asarray(reference.probabilities, dtype=np.float64)
        got_p = np.asarray(bundle.probabilities, dtype=np.float64)
        if ref_p.shape != got_p.shape:
            diff = np.full(n, np.inf)
        else:
            diff = np.max(np.abs(ref_p - got_p), axis=1)
        mismatch = reference.labels != bundle.labels
        gap = np.minimum(_top_gap(ref_p), _top_gap(got_p)) if ref_p.shape == got_p.shape \
            else np.full(n, np.inf)
        ties = mismatch & (gap <= tolerance)
    else:
        ref_v = np.asarray(reference.values, dtype=np.float64)
        got_v = np.asarray(bundle.values, dtype=np.float64)
        diff = np.abs(ref_v - got_v) / np.maximum(1.0, np.abs(ref_v))
        mismatch = np.zeros(n, dtype=bool)
        ties = mismatch
    diff = np.where(np.isnan(diff), np.inf, diff)
    hard_flips = int(np.sum(mismatch & ~ties))
    max_diff = float(np.max(diff)) if n else 0.0
    worst = np.argsort(-diff, kind="stable")[:WORST_ROWS]
    rows = tuple(
        ParityRow(
            row=int(i),
            max_abs_diff=float(min(diff[i], 1e300)),
            reference_label=str(reference.labels[i]),
            bundle_label=str(bundle.labels[i]),
        )
        for i in worst
    )
    passed = bool(max_diff <= tolerance and hard_flips == 0)
    return ParityReport(
        rows=n,
        tolerance=tolerance,
        max_abs_diff=float(min(max_diff, 1e300)),
        mean_abs_diff=float(np.mean(np.minimum(diff, 1e300))) if n else 0.0,
        label_mismatches=int(np.sum(mismatch)),
        boundary_ties=int(np.sum(ties)),
        passed=passed,
        worst_rows=rows,
    )

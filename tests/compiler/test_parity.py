"""The parity gate: tolerance on scores, label flips only forgiven on boundary ties."""

from __future__ import annotations

import numpy as np

from compiler.parity import ReferenceOutputs, parity_report
from edge_agent.model import Prediction


def _labels(*xs: str) -> np.ndarray:
    return np.array(xs, dtype=object)


def test_identical_outputs_pass() -> None:
    """Identical outputs pass with zero difference."""
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    r = parity_report(ReferenceOutputs(_labels("0", "1"), p, None),
                      Prediction(_labels("0", "1"), p.astype(np.float32), None), 1e-4)
    assert r.passed and r.max_abs_diff < 1e-7 and r.label_mismatches == 0


def test_flip_at_boundary_is_a_tie_not_a_failure() -> None:
    """A label flip on a row whose top scores are within the tolerance is counted as a tie."""
    ref = np.array([[0.50002, 0.49998], [0.1, 0.9]])
    got = np.array([[0.49999, 0.50001], [0.1, 0.9]], dtype=np.float32)
    r = parity_report(ReferenceOutputs(_labels("0", "1"), ref, None),
                      Prediction(_labels("1", "1"), got, None), 1e-4)
    assert r.passed
    assert r.label_mismatches == 1 and r.boundary_ties == 1


def test_flip_off_boundary_fails() -> None:
    """A label flip on a confidently scored row fails even when scores are within tolerance."""
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    r = parity_report(ReferenceOutputs(_labels("0", "1"), p, None),
                      Prediction(_labels("1", "1"), p.astype(np.float32), None), 1e-4)
    assert not r.passed and r.boundary_ties == 0 and r.label_mismatches == 1


def test_score_difference_beyond_tolerance_fails_and_names_worst_row() -> None:
    """Probabilities that differ beyond the tolerance fail, worst row first."""
    ref = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    got = np.array([[0.9, 0.1], [0.59, 0.41], [0.3, 0.7]], dtype=np.float32)
    r = parity_report(ReferenceOutputs(_labels("0", "0", "1"), ref, None),
                      Prediction(_labels("0", "0", "1"), got, None), 1e-4)
    assert not r.passed
    assert r.worst_rows[0].row == 1 and abs(r.worst_rows[0].max_abs_diff - 0.01) < 1e-6


def test_regression_difference_is_relative_to_magnitude() -> None:
    """Regression values are compared relative to max(1, |reference|)."""
    ref = np.array([123456.7, 0.5])
    got = np.array([123456.7 + 0.5, 0.5], dtype=np.float64)
    r = parity_report(ReferenceOutputs(_labels("a", "b"), None, ref),
                      Prediction(_labels("a", "b"), None, got.astype(np.float32)), 1e-4)
    assert r.passed and r.max_abs_diff < 1e-5
    bad = parity_report(ReferenceOutputs(_labels("a", "b"), None, ref),
                        Prediction(_labels("a", "b"), None, np.array([123456.7, 0.6],
                                                                     dtype=np.float32)), 1e-4)
    assert not bad.passed and bad.worst_rows[0].row == 1


def test_nan_output_fails() -> None:
    """A NaN from the bundle is an infinite difference, never a pass."""
    r = parity_report(ReferenceOutputs(_labels("a"), None, np.array([1.0])),
                      Prediction(_labels("a"), None, np.array([np.nan], dtype=np.float32)), 1e-4)
    assert not r.passed

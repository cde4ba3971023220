"""Training-reference sketches and calibrated drift thresholds.

Bin edges are frozen from training quantiles (so a device can sketch without the reference data,
unlike re-binning PSI). Thresholds come from resampling: for each window size n we draw R
windows of n rows from the binned training distribution *and* R baselines of the training size
(so the baseline's own sampling noise is counted too — a window drawn from the true distribution
differs from a finite training sample by both), compute PSI and JS distance between each pair,
and keep the (1 - alpha/2) quantile. Using alpha/2 rather than alpha leaves margin for the
quantile's own resampling noise, so a window of any size from the training distribution alarms
at most `alpha` of the time. Drawing bin counts from a multinomial over the training bin
frequencies is bootstrap resampling of the binned training rows; each slot gets half a pseudo-count
first (a Jeffreys prior), so a slot the training sample never hit — typically the overflow bin of
a nearly constant feature — is rare in the resamples rather than impossible.

Thresholds never go below a floor, PSI 0.05 and JS distance 0.1 (about the same effect: for small
shifts JS distance ≈ sqrt(PSI / 5.5)). By convention PSI under 0.1 is "stable"; an effect below
the floor does not matter operationally, and without it a feature that is nearly constant in
training would alarm on a handful of odd rows however large the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compiler.errors import InputDataError
from fleet_protocol.drift import js_rows, psi_rows
from fleet_protocol.manifest import DriftThresholds, FeatureBaseline
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout

__all__ = [
    "CONFIDENCE_EDGES",
    "WINDOW_SIZES",
    "BaselineOptions",
    "calibrate",
    "categorical_layout",
    "feature_baselines",
    "numeric_layout",
]

WINDOW_SIZES = (100, 300, 1000, 3000, 10_000, 30_000, 100_000)
CONFIDENCE_EDGES = tuple(float(x) for x in np.linspace(0.0, 1.0, 11))
MAX_CATEGORIES = 64


@dataclass(frozen=True)
class BaselineOptions:
    n_bins: int = 16
    resamples: int = 400
    false_alarm_rate: float = 0.01
    seed: int = 0
    min_psi: float = 0.05
    min_js: float = 0.1
    #: pseudo-count added to every slot before resampling (Jeffreys prior)
    prior: float = 0.5


def numeric_layout(name: str, values: np.ndarray, n_bins: int) -> FeatureLayout:
    """Quantile bin edges of the finite values (unique; widened when the feature is constant)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        raise InputDataError(
            f"feature {name!r} has no finite values in the training data; cannot build a baseline"
        )
    edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size < 2:
        c = float(edges[0])
        edges = np.array([c, c + max(abs(c) * 1e-6, 1e-6)])
    return FeatureLayout(name, "numeric", edges=tuple(float(e) for e in edges))


def categorical_layout(name: str, values: np.ndarray) -> FeatureLayout:
    """The most frequent categories (up to 64), sorted; everything else counts as "other"."""
    vals = [str(x) for x in values if x is not None and x == x and str(x) != ""]
    if not vals:
        raise InputDataError(f"categorical feature {name!r} has no values in the training data")
    uniq, counts = np.unique(np.asarray(vals, dtype=object).astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")[:MAX_CATEGORIES]
    return FeatureLayout(name, "categorical", categories=tuple(sorted(str(uniq[i]) for i in order)))


def calibrate(counts: Sequence[int] | np.ndarray, options: BaselineOptions,
              rng: np.random.Generator) -> DriftThresholds:
    """Per-window-size PSI and JS thresholds for one feature's baseline counts."""
    c = np.asarray(counts, dtype=np.int64)
    n_train = int(c.sum())
    smoothed = c + options.prior
    p = smoothed / smoothed.sum()
    q = 1.0 - options.false_alarm_rate / 2.0
    psis: list[float] = []
    jss: list[float] = []
    for n in WINDOW_SIZES:
        windows = rng.multinomial(n, p, size=options.resamples)
        bases = rng.multinomial(n_train, p, size=options.resamples)
        psis.append(max(options.min_psi, float(np.quantile(psi_rows(bases, windows), q))))
        jss.append(max(options.min_js, float(np.quantile(js_rows(bases, windows), q))))
    # Larger windows can only need smaller thresholds; where resampling noise says otherwise
    # (at large n the baseline's own noise dominates), keep the larger, safer value.
    psis = list(np.maximum.accumulate(psis[::-1])[::-1])
    jss = list(np.maximum.accumulate(jss[::-1])[::-1])
    return DriftThresholds(
        window_sizes=WINDOW_SIZES,
        psi=tuple(float(x) for x in psis),
        js=tuple(float(x) for x in jss),
        false_alarm_rate=options.false_alarm_rate,
        resamples=options.resamples,
    )


def _baseline_of(sketch: Sketch, j: int, layout: FeatureLayout, options: BaselineOptions,
                 rng: np.random.Generator) -> FeatureBaseline:
    counts = sketch.feature_counts(j)
    if int(counts.sum()) == 0:
        raise InputDataError(f"feature {layout.name!r} is missing in every training row")
    moments = None
    if layout.kind == "numeric":
        m = sketch.moments[j]
        moments = (float(m[0]), float(m[1]), float(m[2]), float(m[3]), float(m[4]))
    return FeatureBaseline(
        name=layout.name,
        kind=layout.kind,
        edges=layout.edges,
        categories=layout.categories,
        counts=tuple(int(x) for x in counts),
        missing=int(sketch.missing[j]),
        moments=moments,
        thresholds=calibrate(counts, options, rng),
    )


def feature_baselines(layouts: Sequence[FeatureLayout], columns: Sequence[np.ndarray],
                      options: BaselineOptions, rng: np.random.Generator
                      ) -> tuple[FeatureBaseline, ...]:
    """Sketch each column over its layout and calibrate its thresholds."""
    layout = SketchLayout(tuple(layouts))
    sketch = Sketch.empty(layout)
    for j, (fl, col) in enumerate(zip(layouts, columns, strict=True)):
        if fl.kind == "numeric":
            sketch.update_numeric(j, np.asarray(col, dtype=np.float64))
        else:
            sketch.update_categorical(j, np.asarray(col, dtype=object))
    return tuple(_baseline_of(sketch, j, fl, options, rng) for j, fl in enumerate(layouts))

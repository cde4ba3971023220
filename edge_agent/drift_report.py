"""Drift of a device's recent windows against the bundle's calibrated baseline.

The same verdict code the hub uses (fleet_protocol.verdict); here it runs offline on the
device's own SQLite windows, merged exactly (sketches add).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.store import WindowRow
from edge_agent.telemetry import layouts_of
from fleet_protocol.manifest import BundleManifest
from fleet_protocol.sketch import Sketch
from fleet_protocol.verdict import QUALITY_NOTE, FeatureVerdict, format_rate, judge_feature

__all__ = ["DriftReport", "drift_report", "drift_table"]


@dataclass(frozen=True)
class DriftReport:
    windows: int
    rows: int
    features: tuple[FeatureVerdict, ...]
    outputs: tuple[FeatureVerdict, ...]

    @property
    def drifted(self) -> list[str]:
        return [v.name for v in self.features + self.outputs if v.drifted]


def drift_report(manifest: BundleManifest, windows: Sequence[WindowRow]) -> DriftReport:
    """Merge the windows' sketches and judge every feature and output."""
    in_layout, out_layout = layouts_of(manifest)
    fingerprint = in_layout.fingerprint() + "/" + out_layout.fingerprint()
    inputs, outputs = Sketch.empty(in_layout), Sketch.empty(out_layout)
    used = [w for w in windows if w.layout == fingerprint]
    for w in used:
        inputs += Sketch.from_bytes(in_layout, w.inputs)
        outputs += Sketch.from_bytes(out_layout, w.outputs)
    evidence = manifest.baseline.min_evidence
    feats = tuple(judge_feature(b, inputs.feature_counts(j), evidence, int(inputs.missing[j]))
                  for j, b in enumerate(manifest.baseline.features))
    outs = tuple(judge_feature(b, outputs.feature_counts(j), evidence, int(outputs.missing[j]))
                 for j, b in enumerate(manifest.baseline.outputs))
    return DriftReport(len(used), sum(w.rows for w in used), feats, outs)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def drift_table(manifest: BundleManifest, windows: Sequence[WindowRow]) -> str:
    report = drift_report(manifest, windows)
    lines = [f"{manifest.name} {manifest.version}: {report.rows} rows in {report.windows} "
             f"window(s); min evidence {manifest.baseline.min_evidence} rows",
             f"{'feature':<22} {'rows':>8} {'missing':>7} {'outside':>7} {'psi':>8} "
             f"{'limit':>8} {'js':>8} {'limit':>8}  verdict"]
    for v in report.features + report.outputs:
        verdict = {"drift": "DRIFT", "ok": "ok", "insufficient": "not enough data"}[v.status]
        lines.append(f"{v.name[:22]:<22} {v.rows:>8} {format_rate(v.missing_rate):>7} "
                     f"{format_rate(v.out_of_range_rate):>7} {_fmt(v.psi):>8} "
                     f"{v.psi_threshold:>8.4f} {_fmt(v.js):>8} {v.js_threshold:>8.4f}  {verdict}")
    drifted = report.drifted
    lines.append(f"{len(drifted)} of {len(report.features) + len(report.outputs)} drifted"
                 + (f": {', '.join(drifted)}" if drifted else ""))
    lines.append(QUALITY_NOTE)
    return "\n".join(lines)

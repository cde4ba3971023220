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
from fleet_protocol.verdict import FeatureVerdict, judge_feature, verdict_lines

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


def drift_table(manifest: BundleManifest, windows: Sequence[WindowRow]) -> str:
    report = drift_report(manifest, windows)
    return "\n".join([f"{manifest.name} {manifest.version}: {report.rows} rows in "
                      f"{report.windows} window(s); min evidence "
                      f"{manifest.baseline.min_evidence} rows",
                      *verdict_lines(report.features + report.outputs)])

"""The sketch layouts a bundle defines, and the layout key windows carry.

A bundle's baseline freezes, per model feature and per output, what its drift sketches count;
the device sketches its windows in these layouts and the hub merges and judges them in the same
ones. A window names them by ``layout_key``: ``"<input fingerprint>/<output fingerprint>"``
(``WindowItem.layout``), so a window sketched under another bundle's layout is never merged
into this one's.
"""

from __future__ import annotations

from fleet_protocol.manifest import BundleManifest, FeatureBaseline
from fleet_protocol.sketch import FeatureLayout, SketchLayout

__all__ = ["layout_key", "layout_of", "layouts_of"]


def layout_of(baselines: tuple[FeatureBaseline, ...]) -> SketchLayout:
    """The sketch layout of baseline features (bin edges or vocabulary, in order)."""
    return SketchLayout(tuple(
        FeatureLayout(b.name, b.kind, edges=b.edges, categories=b.categories) for b in baselines
    ))


def layouts_of(manifest: BundleManifest) -> tuple[SketchLayout, SketchLayout]:
    """The input and output sketch layouts a bundle's baseline defines."""
    return layout_of(manifest.baseline.features), layout_of(manifest.baseline.outputs)


def layout_key(manifest: BundleManifest) -> str:
    """``"<input fingerprint>/<output fingerprint>"``: what ``WindowItem.layout`` holds."""
    inputs, outputs = layouts_of(manifest)
    return f"{inputs.fingerprint()}/{outputs.fingerprint()}"

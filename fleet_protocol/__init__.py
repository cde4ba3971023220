"""Contracts shared by the compiler, the edge agent and the hub.

numpy + pydantic + stdlib only: importing this package never loads numba, onnxruntime or
scikit-learn (tests/fleet_protocol/test_imports.py checks it), so the hub and light tools can use
it without the device or training stacks.
"""

from fleet_protocol.errors import CodecError, ManifestError, ProtocolError, SketchError
from fleet_protocol.manifest import MANIFEST_SCHEMA_VERSION, BundleManifest, parse_manifest
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "BundleManifest",
    "CodecError",
    "FeatureLayout",
    "ManifestError",
    "ProtocolError",
    "Sketch",
    "SketchError",
    "SketchLayout",
    "parse_manifest",
]

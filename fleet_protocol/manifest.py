"""The bundle manifest: what a `.edgebundle` promises about the model inside it.

A bundle is a zip holding ``model.onnx``, ``manifest.json`` and ``manifest.sig``. The Ed25519
signature covers the exact bytes of ``manifest.json`` (:func:`canonical_json`), and the manifest
covers the model by its sha256, so one signature vouches for both.

Every model here is strict (``extra="forbid"``): a manifest written by a newer compiler with
fields this reader does not know is refused with the field's name rather than half-understood.
``schema_version`` is bumped on any change a reader must know about.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleet_protocol.errors import ManifestError

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "BaselineSpec",
    "BundleManifest",
    "DriftThresholds",
    "FeatureBaseline",
    "FeatureSpec",
    "ModelSpec",
    "ParityReport",
    "ParityRow",
    "PreprocessOp",
    "Provenance",
    "TestVector",
    "canonical_json",
    "parse_manifest",
    "parse_semver",
    "semver_key",
]

MANIFEST_SCHEMA_VERSION = 1

# Semantic Versioning 2.0.0, the regular expression the spec itself suggests.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Sha256 = Annotated[str, Field(pattern=_SHA256.pattern)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_semver(version: str) -> tuple[int, int, int, tuple[str, ...]]:
    """Split a semantic version into (major, minor, patch, pre-release identifiers).

    This tuple does not sort by precedence; use :func:`semver_key` to compare versions.
    """
    if not isinstance(version, str):
        raise ManifestError(f"version {version!r:.80} is not a semantic version (expected a "
                            "string such as 1.2.0)")
    return _parse_semver(version)


@functools.lru_cache(maxsize=4096)  # a fleet runs few versions; the hub parses one per window
def _parse_semver(version: str) -> tuple[int, int, int, tuple[str, ...]]:
    m = _SEMVER.match(version)
    if m is None:
        raise ManifestError(f"version {version!r} is not a semantic version (expected e.g. 1.2.0)")
    pre = tuple(m.group(4).split(".")) if m.group(4) else ()
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), pre


SemverKey = tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]


def semver_key(version: str) -> SemverKey:
    """A key that sorts by SemVer 2.0.0 precedence (§11): 1.0.0-rc.2 < 1.0.0-rc.10 < 1.0.0.

    Numeric identifiers compare as numbers and before alphanumeric ones; build data is ignored.
    """
    major, minor, patch, pre = parse_semver(version)
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre)
    return major, minor, patch, 0 if pre else 1, ids


class FeatureSpec(_Strict):
    """One raw input the device receives (before preprocessing)."""

    name: str = Field(min_length=1, max_length=128)
    dtype: Literal["float32", "string"]
    kind: Literal["numeric", "categorical", "signal"]
    #: training range; values outside are served and counted as out-of-range
    min: float | None = None
    max: float | None = None
    #: categorical vocabulary seen in training (other values are served and counted)
    categories: tuple[str, ...] = ()
    #: signal inputs only: samples per window (rows are NaN right-padded)
    length: int | None = Field(default=None, ge=1)


class PreprocessOp(_Strict):
    """One numba op run on the device before the ONNX model (see edge_agent.preprocess)."""

    op: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Strict):
    """How to feed and read the ONNX model."""

    sha256: Sha256
    size_bytes: int = Field(ge=1)
    #: "matrix": one float32 tensor [N, n_features] named ``inputs[0]``;
    #: "columns": one [N, 1] tensor per model feature, named as the feature
    input_mode: Literal["matrix", "columns"]
    inputs: tuple[str, ...]
    label_output: str
    #: classification: the probability output ([N, n_classes] float32); regression: None
    probability_output: str | None = None
    opsets: dict[str, int]


class DriftThresholds(_Strict):
    """Calibrated alarm thresholds of one feature, by window size.

    ``window_sizes`` is increasing; a window of n rows uses the threshold interpolated on
    log(n) (clamped at the ends); below ``min_evidence`` rows a verdict is "not enough data".
    """

    window_sizes: tuple[int, ...]
    psi: tuple[float, ...]
    js: tuple[float, ...]
    false_alarm_rate: float = Field(gt=0, lt=1)
    resamples: int = Field(ge=10)

    @model_validator(mode="after")
    def _same_lengths(self) -> DriftThresholds:
        n = len(self.window_sizes)
        if n == 0 or len(self.psi) != n or len(self.js) != n:
            raise ValueError(
                f"window_sizes ({n}), psi ({len(self.psi)}) and js ({len(self.js)}) "
                "must be non-empty and of equal length"
            )
        if list(self.window_sizes) != sorted(set(self.window_sizes)):
            raise ValueError(f"window_sizes {self.window_sizes} must be strictly increasing")
        return self


class FeatureBaseline(_Strict):
    """Training-reference sketch of one model feature (or of the output)."""

    name: str
    kind: Literal["numeric", "categorical"]
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()
    #: slot counts: numeric [underflow, inner bins..., overflow]; categorical [vocab..., other]
    counts: tuple[int, ...]
    missing: int = Field(ge=0)
    #: count, mean, M2, min, max over finite values (numeric only)
    moments: tuple[float, float, float, float, float] | None = None
    thresholds: DriftThresholds


class BaselineSpec(_Strict):
    """Reference sketches of the model features (training data) and outputs (holdout),
    frozen at compile time."""

    rows: int = Field(ge=1)
    min_evidence: int = Field(ge=1)
    features: tuple[FeatureBaseline, ...]
    outputs: tuple[FeatureBaseline, ...]


class ParityRow(_Strict):
    row: int
    max_abs_diff: float
    reference_label: str
    bundle_label: str


class ParityReport(_Strict):
    """sklearn vs the bundle's device path (numba spec + onnxruntime) on the holdout."""

    rows: int
    tolerance: float
    max_abs_diff: float
    mean_abs_diff: float
    label_mismatches: int
    #: label flips on rows whose top scores are within the tolerance (float32 vs float64)
    boundary_ties: int
    passed: bool
    worst_rows: tuple[ParityRow, ...]


class TestVector(_Strict):
    """An input row and what the bundle answered at compile time."""

    __test__ = False  # not a pytest class

    inputs: dict[str, Any]
    label: str | float
    probabilities: tuple[float, ...] | None = None
    value: float | None = None


class Provenance(_Strict):
    training_sha256: Sha256
    training_rows: int
    holdout_sha256: Sha256
    holdout_rows: int
    libraries: dict[str, str]
    estimator: str
    params: dict[str, Any]
    git_commit: str | None = None
    created_at: str


class BundleManifest(_Strict):
    """Everything a device and the hub need to know about one bundle."""

    schema_version: Literal[1] = 1
    name: str
    version: str
    task: Literal["classification", "regression"]
    labels: tuple[str, ...] = ()
    inputs: tuple[FeatureSpec, ...]
    preprocessing: tuple[PreprocessOp, ...] = ()
    #: the features the ONNX model receives, after preprocessing (what drift sketches watch)
    model_features: tuple[FeatureSpec, ...]
    model: ModelSpec
    baseline: BaselineSpec
    metrics: dict[str, float]
    parity: ParityReport
    test_vectors: tuple[TestVector, ...]
    latency_us: dict[str, float]
    provenance: Provenance
    signer_key_id: str = Field(pattern=r"^[0-9a-f]{16}$")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"name {v!r} must be 1-64 chars of lowercase letters, digits, '.', '_' or '-'"
            )
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _SEMVER.match(v):
            raise ValueError(f"version {v!r} is not a semantic version (expected e.g. 1.2.0)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {list(self.labels)}")
        names = [f.name for f in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input feature names are not unique: {names}")
        if len(self.baseline.features) != len(self.model_features):
            raise ValueError(
                f"baseline has {len(self.baseline.features)} features, "
                f"model_features has {len(self.model_features)}"
            )
        return self

    @property
    def bundle_filename(self) -> str:
        return f"{self.name}-{self.version}.edgebundle"

    def version_key(self) -> SemverKey:
        return semver_key(self.version)


def canonical_json(manifest: BundleManifest) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    data = manifest.model_dump(mode="json")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def parse_manifest(raw: bytes | str) -> BundleManifest:
    """Parse and validate manifest JSON, raising ManifestError naming the first bad field."""
    try:
        return BundleManifest.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ManifestError(
            f"manifest field {loc}: {first['msg']} (got {first.get('input')!r:.80})"
            f" [{err.error_count()} error(s)]"
        ) from err

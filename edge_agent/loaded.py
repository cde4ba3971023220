"""A bundle made ready to serve, and what a request gets back.

:func:`load_model` turns a bundle file into a :class:`LoadedModel`: its signature and hashes
verified, the model loaded into onnxruntime with the configured threads, its own test vectors
replayed on this device; any failure is a BundleError naming the bundle, and nothing is
served from it. :class:`PredictResult` is one request's answer, its prediction ids and a
batch's labels derived only when read. The agent (:mod:`edge_agent.agent`) keeps loaded
models in its slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import VerifiedBundle, read_bundle
from edge_agent.config import AgentConfig
from edge_agent.errors import AgentError, BundleError
from edge_agent.model import BundleModel, Prediction
from edge_agent.telemetry import ModelTelemetry
from edge_agent.validation import InputValidator

__all__ = ["LoadedModel", "PredictResult", "load_model"]


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle, loaded and checked against its own test vectors."""

    bundle: VerifiedBundle
    model: BundleModel
    validator: InputValidator
    telemetry: ModelTelemetry
    path: Path

    # cached: every request reads them
    @functools.cached_property
    def name(self) -> str:
        return self.bundle.manifest.name

    @functools.cached_property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def sha256(self) -> str:
        return self.bundle.manifest.model.sha256


@dataclass(slots=True)
class PredictResult:
    """Outputs of one request; ids and a batch's labels are derived on demand (cheap for big
    batches)."""

    model_name: str
    model_version: str
    first_id: int
    boot: str
    prediction: Prediction

    @property
    def labels(self) -> np.ndarray:
        """Each row's label (object array of str)."""
        return self.prediction.labels

    @property
    def probabilities(self) -> np.ndarray | None:
        """Classifiers: float32 (n, n_classes) in the manifest's label order."""
        return self.prediction.probabilities

    @property
    def values(self) -> np.ndarray | None:
        """Regressors: float32 (n,)."""
        return self.prediction.values

    @property
    def n(self) -> int:
        return len(self.prediction)

    @property
    def ids(self) -> list[str]:
        return [f"{self.boot}-{self.first_id + i:x}" for i in range(self.n)]

    @property
    def id(self) -> str:
        return f"{self.boot}-{self.first_id:x}"


def load_model(path: Path, trusted: list[Any], config: AgentConfig,
               checked: MutableMapping[str, Any] | None = None) -> LoadedModel:
    """Verify, load into onnxruntime and replay test vectors; BundleError on any failure."""
    bundle = read_bundle(path, trusted, checked=checked)
    model = BundleModel.from_bundle(bundle, intra_op_threads=config.runtime.intra_op_threads,
                                    inter_op_threads=config.runtime.inter_op_threads)
    try:
        failures = model.replay_test_vectors(bundle.manifest.test_vectors)
    except AgentError:
        raise
    except Exception as err:  # onnxruntime's own types: the model and its manifest disagree
        raise BundleError(f"bundle {path}: onnxruntime cannot run its test vectors: {err}"
                          ) from err
    if failures:
        raise BundleError(
            f"bundle {path}: {len(failures)} of {len(bundle.manifest.test_vectors)} test "
            f"vectors fail on this device; first: #{failures[0].index} {failures[0].reason}")
    m = bundle.manifest
    # the session holds the model now; the bundle's copy of its bytes would stay resident as
    # long as the model is loaded (nothing reads it after loading)
    bundle = dataclasses.replace(bundle, model_bytes=b"")
    return LoadedModel(bundle, model, InputValidator(m.inputs, m.model.input_mode),
                       ModelTelemetry(m.name, m.version, m), path)

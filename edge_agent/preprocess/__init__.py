"""Preprocessing shared by training and the device: numba kernels behind one validated spec.

``run_spec(ops, X)`` is the single entry point; ``kernels`` holds the numba code (its FFT is in
``spectrum``) and ``reference`` its plain-Python twin for tests.
"""

from edge_agent.preprocess.spec import (
    OP_NAMES,
    WINDOW_FEATURES,
    output_names,
    run_spec,
    validate_op,
    validate_spec,
    warmup,
)

__all__ = [
    "OP_NAMES",
    "WINDOW_FEATURES",
    "output_names",
    "run_spec",
    "validate_op",
    "validate_spec",
    "warmup",
]

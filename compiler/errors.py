"""Errors raised by the compiler.

Hierarchy::

    CompileError                  base of everything this package raises
    ├── InputDataError            training/holdout data unreadable, empty, wrong shape or type
    ├── UnsupportedModelError     an estimator or pipeline step the compiler cannot export
    ├── ModelNotFittedError       the estimator has not been fitted
    ├── ParityError               the exported model disagrees with the original
    └── SigningError              a key is missing, unreadable or of the wrong kind

The CLI turns each into one line and a non-zero exit code.
"""

from __future__ import annotations


class CompileError(Exception):
    """Base class of every error raised by the compiler."""


class InputDataError(CompileError):
    """Training or holdout data cannot be used."""


class UnsupportedModelError(CompileError):
    """The pipeline contains something the compiler cannot export."""


class ModelNotFittedError(CompileError):
    """The estimator has not been fitted."""


class ParityError(CompileError):
    """The bundle's device path disagrees with the original pipeline beyond the tolerance."""


class SigningError(CompileError):
    """A signing key is missing, unreadable or not an Ed25519 key."""

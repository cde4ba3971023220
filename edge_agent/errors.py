"""Errors raised by the edge agent.

Hierarchy::

    AgentError                    base of everything this package raises
    ├── BundleError               a bundle that is truncated, tampered, badly signed or unsafe
    │   └── SignatureError        the signature does not verify against any trusted key
    └── PreprocessError           a preprocessing spec or input that the kernels cannot run

Each message says what failed, the value, and what was expected.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error raised by edge_agent."""


class BundleError(AgentError):
    """A bundle cannot be trusted or loaded."""


class SignatureError(BundleError):
    """A bundle's signature does not verify against any trusted key."""


class PreprocessError(AgentError):
    """A preprocessing spec or its input is invalid."""

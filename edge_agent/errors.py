"""Errors raised by the edge agent.

Hierarchy::

    AgentError                    base of everything this package raises
    ├── BundleError               a bundle that is truncated, tampered, badly signed or unsafe
    │   └── SignatureError        the signature does not verify against any trusted key
    ├── PreprocessError           a preprocessing spec or input that the kernels cannot run
    ├── InputError                a request that does not match the bundle's input schema (4xx)
    ├── ConfigError               a config file or environment variable with a bad key or value
    ├── NotReadyError             no verified model is serving (503)
    ├── FeedbackError             feedback for an unknown prediction or a bad label (4xx)
    └── StoreError                the agent's SQLite database cannot be opened or migrated

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


class InputError(AgentError):
    """A request does not match the bundle's input schema."""


class ConfigError(AgentError):
    """The agent's configuration is invalid."""


class NotReadyError(AgentError):
    """No verified model is serving."""


class FeedbackError(AgentError):
    """Feedback that names an unknown prediction or carries a bad label."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class StoreError(AgentError):
    """The agent's database cannot be opened or migrated."""

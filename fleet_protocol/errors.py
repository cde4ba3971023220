"""Errors raised by fleet_protocol.

Hierarchy::

    ProtocolError                 base of everything this package raises
    ├── SketchError               sketches that do not fit their layout, or layouts that differ
    ├── CodecError                bytes that do not decode to a sketch (truncated, wrong version)
    ├── ManifestError             a bundle manifest that does not validate
    ├── MessageError              an MQTT payload that is oversized, malformed or invalid
    │                             (fleet_protocol.messages)
    └── TopicError                a topic or device id outside edgefleet/v1/<device>/<kind>
                                  (fleet_protocol.topics)

Each message says what failed, the value, and what was expected.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error raised by fleet_protocol."""


class SketchError(ProtocolError):
    """A sketch or layout is inconsistent, or two sketches cannot be merged."""


class CodecError(ProtocolError):
    """Serialized bytes could not be decoded."""


class ManifestError(ProtocolError):
    """A bundle manifest is invalid."""

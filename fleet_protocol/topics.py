"""MQTT topic names of protocol v1, and the one parser the hub and the agent read them with.

Every topic is ``edgefleet/v1/<device>/<kind>``::

    kind        direction      retained  payload (fleet_protocol.messages)
    telemetry   device → hub   no        TelemetryEnvelope
    state       device → hub   yes       StateMessage (the last will is StateMessage.offline)
    receipt     hub → device   no        Receipt
    cmd         hub → device   no        Command
    ack         device → hub   no        Ack

The hub subscribes to the device → hub kinds through a shared subscription
(``$share/<group>/edgefleet/v1/+/<kind>``), so several hub workers split the fleet between them;
Mosquitto honours ``$share`` for MQTT 5 and 3.1.1 clients alike (FIELD-NOTES, "Delivery facts").
A message received through a shared subscription carries the plain topic, so :func:`parse` never
sees ``$share``.

A device id is 1-128 characters of ASCII letters, digits, ``-``, ``_`` and ``.``, and neither
``.`` nor ``..``. So it is one topic level and never a wildcard (``/``, ``+``, ``#``), never a
``$`` system topic, and safe as a file or folder name on the hub (the two dot names are refused
for that reason only). Every function here validates it, and so do the message models.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from fleet_protocol.errors import ProtocolError

__all__ = [
    "DEVICE_KINDS",
    "HUB_KINDS",
    "KINDS",
    "PROTOCOL",
    "Kind",
    "TopicError",
    "ack",
    "check_device_id",
    "cmd",
    "device_subscriptions",
    "hub_subscriptions",
    "parse",
    "receipt",
    "state",
    "telemetry",
    "topic",
]

PROTOCOL = "edgefleet/v1"
Kind = Literal["telemetry", "state", "receipt", "cmd", "ack"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: kinds a device publishes (the hub subscribes to them)
DEVICE_KINDS: tuple[Kind, ...] = ("telemetry", "state", "ack")
#: kinds the hub publishes (each device subscribes to its own)
HUB_KINDS: tuple[Kind, ...] = ("receipt", "cmd")

MAX_DEVICE_ID_CHARS = 128
_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_GROUP = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: ids already found valid (a fleet's worth; cleared when full)
_known_good: set[str] = set()
_KNOWN_GOOD_MAX = 100_000


class TopicError(ProtocolError):
    """A topic, device id or subscription group that protocol v1 does not allow."""


def check_device_id(device: object) -> str:
    """Return ``device`` if it is a valid device id, else raise TopicError saying why."""
    if not isinstance(device, str):
        raise TopicError(f"device id must be a string, got {type(device).__name__}")
    if device in _known_good:  # the hub checks every message's id twice (topic, payload)
        return device
    if not _DEVICE_ID.fullmatch(device) or device in (".", ".."):
        raise TopicError(
            f"device id {device!r:.160} is not valid: expected 1-{MAX_DEVICE_ID_CHARS} ASCII "
            "letters, digits, '-', '_' or '.' (not '.' or '..'; no '/', '+', '#', '$' or spaces)"
        )
    if len(_known_good) >= _KNOWN_GOOD_MAX:
        _known_good.clear()
    _known_good.add(device)
    return device


def topic(device: str, kind: Kind) -> str:
    """The topic of ``kind`` for ``device``: ``edgefleet/v1/<device>/<kind>``."""
    if kind not in KINDS:
        raise TopicError(f"topic kind {kind!r} is not one of {', '.join(KINDS)}")
    return f"{PROTOCOL}/{check_device_id(device)}/{kind}"


def telemetry(device: str) -> str:
    """Device → hub telemetry envelopes."""
    return topic(device, "telemetry")


def state(device: str) -> str:
    """Device → hub retained state (and the device's last will)."""
    return topic(device, "state")


def receipt(device: str) -> str:
    """Hub → device receipts: the highest sequence number stored without gaps."""
    return topic(device, "receipt")


def cmd(device: str) -> str:
    """Hub → device signed commands."""
    return topic(device, "cmd")


def ack(device: str) -> str:
    """Device → hub answers to commands."""
    return topic(device, "ack")


def hub_subscriptions(group: str = "hub") -> tuple[str, ...]:
    """The shared-subscription filters a hub worker of ``group`` subscribes to.

    ``$share/<group>/edgefleet/v1/+/<kind>`` for telemetry, state and ack. Workers of one group
    split the messages between them; a second group (say an archiver) gets its own copy.
    """
    if not isinstance(group, str) or not _GROUP.fullmatch(group):
        raise TopicError(
            f"shared subscription group {group!r:.80} is not valid: expected 1-64 ASCII "
            "letters, digits, '-', '_' or '.'"
        )
    return tuple(f"$share/{group}/{PROTOCOL}/+/{kind}" for kind in DEVICE_KINDS)


def device_subscriptions(device: str) -> tuple[str, ...]:
    """The topics a device subscribes to: its own receipt and cmd topics (no wildcards)."""
    return tuple(topic(device, kind) for kind in HUB_KINDS)


def parse(name: str) -> tuple[str, Kind]:
    """Split a protocol v1 topic into (device id, kind); TopicError for any other topic.

    >>> parse("edgefleet/v1/pi-17/telemetry")
    ('pi-17', 'telemetry')
    """
    if not isinstance(name, str):
        raise TopicError(f"topic must be a string, got {type(name).__name__}")
    parts = name.split("/")
    prefix = PROTOCOL.split("/")
    if len(parts) != len(prefix) + 2 or parts[: len(prefix)] != prefix:
        raise TopicError(
            f"topic {name!r:.200} is not a protocol v1 topic: expected "
            f"'{PROTOCOL}/<device>/<kind>' with kind one of {', '.join(KINDS)}"
        )
    device, kind = parts[-2], parts[-1]
    for known in KINDS:
        if kind == known:
            return check_device_id(device), known
    raise TopicError(
        f"topic {name!r:.200}: kind {kind!r:.40} is not one of {', '.join(KINDS)}"
    )

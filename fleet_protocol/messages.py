"""MQTT payloads of protocol v1: the strict message models.

Topics are in :mod:`fleet_protocol.topics`; each kind carries one model here
(:data:`MESSAGE_TYPES`). Every model is strict (``extra="forbid"``, frozen, finite floats),
carries ``protocol: 1`` and the ``device_id`` its topic names, and bounds every size: item
count, bytes of a sketch, characters of a string, depth and number of values of a free-form
dict. Free-form dicts (window metrics, event detail, health, command args) are plain JSON
objects checked by one iterative walk; there are no recursive schemas (FIELD-NOTES, "Security
facts": validation time of recursive schemas can explode).

Delivery (DESIGN, "Delivery and durability"): each :class:`TelemetryEnvelope` holds one outbox
batch under the device's outbox ``stream`` (a random id made with its outbox database, so a
database reset starts a new stream instead of reusing old seqs), a ``seq`` (1, 2, 3, ... without
gaps within a stream) and a ``message_id`` that stays the same when the batch is resent. The hub
stores each (device, stream, seq) once and answers with a :class:`Receipt` naming the stream and
the highest seq it holds without gaps; only then does the agent delete those outbox rows. The
retained :class:`StateMessage` says what runs; the last will registered at connect is
:meth:`StateMessage.offline`. :class:`Command` is signed by the hub (Ed25519 over
:meth:`UnsignedCommand.canonical_bytes`; the signing itself lives with ``cryptography`` in the
hub and agent adapters, never here) and answered by an :class:`Ack`.

The bytes these models travel as (canonical JSON, zlib above a size, the checks before any
parsing) are :mod:`fleet_protocol.wire`; the bounded free-form JSON values (metrics, event
detail, command args) are checked by :mod:`fleet_protocol.json_values`.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fleet_protocol import codec, topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.json_values import (
    INT64_MAX,
    MAX_TEXT_CHARS,
    check_json,
    check_text,
    printable,
)
from fleet_protocol.manifest import parse_semver

__all__ = ["MAX_ITEMS", "MESSAGE_TYPES", "PROTOCOL_VERSION", "Ack", "BaseMessage", "Command",
    "EventItem", "Message", "MessageError", "Receipt", "SampleItem", "SlotInfo", "Slots",
    "StateMessage", "TelemetryEnvelope", "UnsignedCommand", "WindowItem", "canonical_json",
    "error_text", "new_message_id", "new_stream_id", "window_item_from"]

PROTOCOL_VERSION: Literal[1] = 1
MAX_ITEMS = 500
MAX_SKETCH_BYTES = 256 * 1024
MAX_SAMPLE_CHARS = 16 * 1024
#: free-form dicts: (container depth, values) -- the agent's metrics reach depth 4 (a confusion
#: matrix: metrics.feedback.confusion[i][j]) and ~3 values per feature
METRICS_LIMITS = (6, 20_000)
DETAIL_LIMITS = (3, 256)
ARGS_LIMITS = (4, 256)
#: domain separation: a command signature can never be mistaken for one over other JSON
COMMAND_SIGNING_CONTEXT = b"edgefleet/v1 command\n"
ITEM_KINDS = ("window", "event", "sample")


class MessageError(ProtocolError):
    """A payload that is not a valid protocol v1 message, or a message too large to send.

    ``field`` is the dotted path of the first bad field (None when the bytes never got as far
    as a field: too large, not JSON, not zlib).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _valid(check: Callable[[str], object]) -> Callable[[str], str]:
    """A pydantic validator from one of our checks that raise ProtocolError."""

    def run(v: str) -> str:
        try:
            check(v)
        except ProtocolError as err:
            raise ValueError(str(err)) from None
        return v

    return run


def _sample_json(v: str) -> str:
    check_text(v, MAX_SAMPLE_CHARS, "inputs")
    try:
        json.loads(v)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"inputs is not a JSON text: {err}") from None
    return v


def _base64_decoder(limit: int) -> Callable[[Any, ValidationInfo], Any]:
    def decode_base64(value: Any, info: ValidationInfo) -> Any:
        if info.mode != "json" or not isinstance(value, str):
            return value  # Python callers pass bytes; the bytes validator refuses the rest
        if len(value) > 4 * -(-limit // 3):
            raise ValueError(f"base64 text of {len(value)} chars encodes more than {limit} bytes")
        try:  # what base64.b64decode(value, validate=True) does, without its wrapper
            raw = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"not valid base64: {err}") from None
        # canonical: the strict decode used every character but the final padding, so only
        # the last 4-character group can spell its bytes another way (non-zero padding bits)
        n = len(raw)
        if len(value) != 4 * -(-n // 3) or (
                n and base64.b64encode(raw[3 * ((n - 1) // 3):]).decode("ascii") != value[-4:]):
            raise ValueError("not canonical base64 (non-zero padding bits)")
        return raw

    return decode_base64


DeviceId = Annotated[str, AfterValidator(_valid(topics.check_device_id))]
Timestamp = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
Seq = Annotated[int, Field(ge=1, le=INT64_MAX)]
#: same rule as BundleManifest.name
ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
ModelVersion = Annotated[str, Field(max_length=128), AfterValidator(_valid(parse_semver))]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
AgentVersion = Annotated[str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
Uuid = Annotated[
    str, Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
]
Layout = Annotated[str, Field(pattern=r"^[0-9a-f]{16}/[0-9a-f]{16}$")]
#: an outbox stream: random, made with the device's outbox (see :func:`new_stream_id`)
StreamId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
Text = Annotated[str, AfterValidator(partial(check_text, limit=MAX_TEXT_CHARS))]
_AsBase64 = PlainSerializer(lambda v: base64.b64encode(v).decode("ascii"), return_type=str,
                            when_used="json")
SketchBytes = Annotated[
    bytes, Field(strict=True, min_length=codec.HEADER_BYTES, max_length=MAX_SKETCH_BYTES),
    BeforeValidator(_base64_decoder(MAX_SKETCH_BYTES)), _AsBase64,
]
Signature = Annotated[
    bytes, Field(strict=True, min_length=64, max_length=64), BeforeValidator(_base64_decoder(64)),
    _AsBase64,
]
Metrics = Annotated[dict[str, Any], AfterValidator(partial(check_json, limits=METRICS_LIMITS))]
Detail = Annotated[dict[str, Any], AfterValidator(partial(check_json, limits=DETAIL_LIMITS))]
Args = Annotated[dict[str, Any], AfterValidator(partial(check_json, limits=ARGS_LIMITS))]
SampleJson = Annotated[str, AfterValidator(_sample_json)]
MAX_TAGS = 32
TagKey = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
TagValue = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
#: a device's labels for fleet selectors ("site", "cohort", "line"...), from its config
Tags = Annotated[dict[TagKey, TagValue], Field(max_length=MAX_TAGS)]
#: the agent's swap phases (edge_agent.swap_events.SwapPhase; a test keeps the two equal)
SwapPhaseName = Literal["idle", "staging", "staged", "shadow", "promoted", "committed",
                        "rolling_back", "rolled_back", "failed"]
CommandKind = Literal["stage", "shadow", "promote", "commit", "rollback", "configure"]
AckStatus = Literal["ok", "refused", "expired", "bad_signature", "replayed"]


def _an_int(value: Any) -> Any:
    """A protocol version is a JSON integer: ``true`` and ``1.0`` equal 1 in Python, and a
    ``Literal[1]`` took them even in strict mode."""
    if type(value) is not int:
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": str(PROTOCOL_VERSION)})
    return value


#: the protocol field: the integer 1 and nothing equal to it
ProtocolVersion = Annotated[Literal[1], BeforeValidator(_an_int)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BaseMessage(_Strict):
    """Fields every message has; the size limits :func:`fleet_protocol.wire.encode` and
    :func:`fleet_protocol.wire.decode` apply."""

    MAX_WIRE_BYTES: ClassVar[int] = 16 * 1024
    MAX_JSON_BYTES: ClassVar[int] = 64 * 1024

    protocol: ProtocolVersion = PROTOCOL_VERSION
    device_id: DeviceId


class WindowItem(_Strict):
    """One closed telemetry window of one model version: its two sketches and its metrics."""

    kind: Literal["window"] = "window"
    model_name: ModelName
    model_version: ModelVersion
    slot: Literal["blue", "green"]
    start: Timestamp
    end: Timestamp
    #: "<input layout fingerprint>/<output layout fingerprint>"
    layout: Layout
    #: ``Sketch.to_bytes()`` of the input and output sketches (base64 in JSON)
    inputs: SketchBytes
    outputs: SketchBytes
    #: the agent's metrics dict (requests, latency histogram, feedback, shadow, ...)
    metrics: Metrics
    rows: Count

    @model_validator(mode="after")
    def _consistent(self) -> WindowItem:
        if not self.end > self.start:
            raise ValueError(f"end {self.end} must be after start {self.start}")
        for name, data, fingerprint in (("inputs", self.inputs, self.input_fingerprint),
                                        ("outputs", self.outputs, self.output_fingerprint)):
            written = data[2:codec.HEADER_BYTES].hex()
            if data[0] != codec.MAGIC or written != fingerprint:
                raise ValueError(
                    f"{name} is not a sketch of layout {fingerprint} (first byte "
                    f"0x{data[0]:02X}, written for layout {written})"
                )
        return self

    @property
    def input_fingerprint(self) -> str:
        return self.layout.split("/")[0]

    @property
    def output_fingerprint(self) -> str:
        return self.layout.split("/")[1]


class EventItem(_Strict):
    """Something that happened on the device (a swap transition, a refused bundle, a drift)."""

    kind: Literal["event"] = "event"
    ts: Timestamp
    event: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    detail: Detail = Field(default_factory=dict)


class SampleItem(_Strict):
    """One raw input row of a prediction, sent only when the device opted in to sampling."""

    kind: Literal["sample"] = "sample"
    prediction_id: Identifier
    ts: Timestamp
    model_version: ModelVersion
    #: the model inputs as the agent stored them (a JSON text)
    inputs: SampleJson


Item = Annotated[WindowItem | EventItem | SampleItem, Field(discriminator="kind")]


class TelemetryEnvelope(BaseMessage):
    """Device → hub: one outbox batch under a per-device sequence number."""

    MAX_WIRE_BYTES: ClassVar[int] = 1024 * 1024
    MAX_JSON_BYTES: ClassVar[int] = 4 * 1024 * 1024

    #: the device's outbox stream: a new one when its database is reset (seqs restart at 1)
    stream: StreamId
    #: unique per batch, unchanged when the batch is resent (see :func:`new_message_id`)
    message_id: Uuid
    #: 1, 2, 3, ... per (device, stream), without gaps; the hub stores each key once
    seq: Seq
    sent_at: Timestamp
    agent_version: AgentVersion
    items: tuple[Item, ...] = Field(min_length=1, max_length=MAX_ITEMS)


class SlotInfo(_Strict):
    """The bundle loaded in one slot."""

    name: ModelName
    version: ModelVersion
    sha256: Sha256


class Slots(_Strict):
    """What each slot holds (None: empty)."""

    blue: SlotInfo | None = None
    green: SlotInfo | None = None


class StateMessage(BaseMessage):
    """Device → hub, retained: what runs where, the swap phase, health.

    The agent registers :meth:`offline` as its last will when it connects (and publishes it
    itself on a clean stop), then publishes an online state. A will is composed at connect
    time, so it carries no slots, phase or health, which may have changed since: the hub keeps
    those from the last online state and only marks the device offline (``ts`` of a will is the
    connect time; the hub's own clock says when the device dropped).
    """

    online: bool
    agent_version: AgentVersion
    slots: Slots = Field(default_factory=Slots)
    #: required when online
    swap_phase: SwapPhaseName | None = None
    health: Detail = Field(default_factory=dict)
    #: the device's own tags (config ``tags``); the hub adds operator tags beside them
    tags: Tags = Field(default_factory=dict)
    ts: Timestamp

    @model_validator(mode="after")
    def _phase_when_online(self) -> StateMessage:
        if self.online and self.swap_phase is None:
            raise ValueError("an online state needs a swap_phase")
        return self

    @classmethod
    def offline(cls, device_id: str, *, agent_version: str, ts: float) -> StateMessage:
        """The last-will message: ``device_id`` is offline (retained on the state topic)."""
        return cls(device_id=device_id, online=False, agent_version=agent_version, ts=ts)


class Receipt(BaseMessage):
    """Hub → device: every seq up to ``up_to_seq`` of outbox ``stream`` is stored (0: nothing
    yet). A device ignores receipts of another stream (one of its database before a reset)."""

    MAX_WIRE_BYTES: ClassVar[int] = 1024
    MAX_JSON_BYTES: ClassVar[int] = 1024

    stream: StreamId

    up_to_seq: Count
    ts: Timestamp


class UnsignedCommand(BaseMessage):
    """A command before the hub signs it; :meth:`signed` adds the signature."""

    command_id: Identifier
    #: signer key, as BundleManifest.signer_key_id: first 16 hex digits of sha256(raw key)
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    #: grows with every command to this device; the device refuses one not above the last seen
    seq: Seq
    issued_at: Timestamp
    expires_at: Timestamp
    kind: CommandKind
    args: Args = Field(default_factory=dict)

    @model_validator(mode="after")
    def _expiry(self) -> UnsignedCommand:
        if not self.expires_at > self.issued_at:
            raise ValueError(f"expires_at {self.expires_at} must be after issued_at "
                             f"{self.issued_at}")
        return self

    def canonical_bytes(self) -> bytes:
        """The bytes an Ed25519 signature covers: a context line, then the JSON of every field
        but the signature (sorted keys, no spaces, UTF-8). Key order of ``args`` is irrelevant."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return COMMAND_SIGNING_CONTEXT + canonical_json(data)

    def signed(self, signature: bytes) -> Command:
        """This command with its 64-byte Ed25519 signature over :meth:`canonical_bytes`."""
        fields = {k: v for k, v in self if k != "signature"}
        return Command(**fields, signature=signature)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


class Command(UnsignedCommand):
    """Hub → device: a signed command (verify with ``cryptography`` before acting on it)."""

    signature: Signature


class Ack(BaseMessage):
    """Device → hub: the answer to one command."""

    MAX_WIRE_BYTES: ClassVar[int] = 4 * 1024

    command_id: Identifier
    status: AckStatus
    reason: Text = ""
    ts: Timestamp


Message = TelemetryEnvelope | StateMessage | Receipt | Command | Ack
MESSAGE_TYPES: Mapping[topics.Kind, type[BaseMessage]] = {
    "telemetry": TelemetryEnvelope, "state": StateMessage, "receipt": Receipt, "cmd": Command,
    "ack": Ack,
}


def canonical_json(data: Any) -> bytes:
    """The canonical JSON bytes of ``data`` (sorted keys, no spaces, UTF-8, finite numbers):
    what a payload and a command signature are made of; MessageError if it is not JSON."""
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError) as err:  # UnicodeEncodeError is a ValueError
        raise MessageError(f"message does not encode as JSON: {err}") from err


def error_text(err: ValidationError) -> tuple[str, str]:
    """(message, dotted field) of a model's first validation error, as MessageError says it."""
    raw = err.errors(include_url=False)
    # a tuple whose bad item was dropped is also "too short": an echo of that item's error
    errors = [e for e in raw if not (e["type"] == "too_short" and any(
        o["loc"][: len(e["loc"])] == e["loc"] and o["loc"] != e["loc"] for o in raw))]
    errors.sort(key=lambda e: e["loc"][:1] != ("protocol",))
    first = errors[0]
    loc = first["loc"]
    # drop the discriminator tag pydantic puts after an item index: items.0.window.rows
    parts = [printable(p) for i, p in enumerate(loc)
             if not (i == 2 and loc[0] == "items" and isinstance(loc[1], int) and p in ITEM_KINDS)]
    field = ".".join(parts) or "(root)"
    text = f"{field}: {first['msg']} (got {_short(first.get('input'))})"
    if loc == ("protocol",):
        text += f"; this build speaks protocol {PROTOCOL_VERSION}: upgrade it to read newer ones"
    if len(errors) > 1:
        text += f" [and {len(errors) - 1} more error(s)]"
    return text, field


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def new_stream_id() -> str:
    """A fresh random outbox stream id (16 lowercase hex), made once with a device's outbox."""
    return secrets.token_hex(8)


def new_message_id() -> str:
    """A fresh random message id (UUID4); store it with the outbox batch, reuse it on resend."""
    return str(uuid.uuid4())


def window_item_from(*, model_name: str, model_version: str, slot: str, start: float,
                     end: float, layout: str, inputs: bytes, outputs: bytes,
                     metrics: Mapping[str, Any] | str, rows: int) -> WindowItem:
    """A WindowItem from plain values (the fields of the agent's closed WindowRow).

    ``metrics`` may be the dict or its JSON text as stored; MessageError names a bad field.
    """
    if isinstance(metrics, str):
        try:
            metrics = json.loads(metrics)
        except (ValueError, RecursionError) as err:
            raise MessageError(f"metrics: not a JSON text ({err})", "metrics") from err
    try:
        return WindowItem(model_name=model_name, model_version=model_version, slot=slot,
                          start=start, end=end, layout=layout, inputs=bytes(inputs),
                          outputs=bytes(outputs), metrics=metrics, rows=rows)
    except ValidationError as err:
        text, field = error_text(err)
        raise MessageError(text, field) from err


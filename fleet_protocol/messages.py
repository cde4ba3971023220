"""MQTT payloads of protocol v1: strict message models and the bytes they travel as.

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

Wire format (:func:`encode` / :func:`decode`): UTF-8 JSON, sorted keys, no spaces, bytes as
standard padded base64 (canonical: decoding refuses any other spelling). Payloads longer than
:data:`COMPRESS_ABOVE` bytes are zlib-compressed (when that makes them smaller). No extra marker
byte: plain payloads always begin with ``{`` (0x7B) and zlib streams always with their CMF byte
0x78 (deflate, 32 KiB window), so the first byte tells them apart, plain payloads stay readable
in ``mosquitto_sub``, and any other first byte is refused. :func:`decode` checks, in order: the
raw size against the model's ``MAX_WIRE_BYTES`` (before reading a single byte of it), the first
byte, the decompressed size against ``MAX_JSON_BYTES`` (inflating at most one byte past it, so a
zip bomb costs nothing), then strict validation. Every failure is a :class:`MessageError` naming
the field and the value, e.g. ``items.0.rows: Input should be greater than or equal to 0 (got
-1)``.

Measured size (zlib level 6; tests/fleet_protocol/test_messages.py rebuilds it and checks the
numbers): one envelope holding one closed 5-minute window at 10 predictions/s (3,000 rows),
input sketch of 16 numeric features x 16 bins (1,214 B binary), output sketch of a 3-class label
and its score in 16 bins (89 B), and the metrics the agent writes (1,416 B of JSON: latency
histogram, confusion matrix, per-feature counts)::

    encoded envelope          plain JSON 3,566 B    zlib (what is sent) 1,841 B
    the same rows as CSV      447,525 B (16 columns, 7 significant digits, one header line)
    ratio raw CSV / sent      243x  (126x uncompressed)

So one 5-minute window at 10/s is ~4x short of the 1000x target: a sketch costs the same
whatever it summarises (half the input sketch is its 16 x 40 B float64 moments), so only traffic
per window moves the ratio. Measured: 12 windows of an hour in one envelope 14,182 B (381x); one
hourly window 1,973 B (2,722x); 5-minute windows at 100/s 1,966 B each (2,277x).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import sys
import uuid
import zlib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Annotated, Any, ClassVar, Literal, TypeVar

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
from fleet_protocol.manifest import parse_semver

__all__ = ["COMPRESS_ABOVE", "MAX_ITEMS", "MESSAGE_TYPES", "PROTOCOL_VERSION", "Ack",
    "BaseMessage", "Command", "EventItem", "Message", "MessageError", "Receipt", "SampleItem",
    "SlotInfo", "Slots", "StateMessage", "TelemetryEnvelope", "UnsignedCommand", "WindowItem",
    "decode", "decode_for_topic", "encode", "encode_receipt", "envelope_key", "new_message_id",
    "new_stream_id", "window_item_from"]

PROTOCOL_VERSION: Literal[1] = 1
COMPRESS_ABOVE = 1024
COMPRESS_LEVEL = 6
MAX_ITEMS = 500
MAX_SKETCH_BYTES = 256 * 1024
MAX_TEXT_CHARS = 1024
MAX_KEY_CHARS = 256
MAX_SAMPLE_CHARS = 16 * 1024
#: free-form dicts: (container depth, values) -- the agent's metrics reach depth 4 (a confusion
#: matrix: metrics.feedback.confusion[i][j]) and ~3 values per feature
METRICS_LIMITS = (6, 20_000)
DETAIL_LIMITS = (3, 256)
ARGS_LIMITS = (4, 256)
INT64_MAX = 2**63 - 1
#: domain separation: a command signature can never be mistaken for one over other JSON
COMMAND_SIGNING_CONTEXT = b"edgefleet/v1 command\n"
ITEM_KINDS = ("window", "event", "sample")
_ZLIB_FIRST = 0x78
_JSON_FIRST = ord("{")


class MessageError(ProtocolError):
    """A payload that is not a valid protocol v1 message, or a message too large to send.

    ``field`` is the dotted path of the first bad field (None when the bytes never got as far
    as a field: too large, not JSON, not zlib).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _text_ok(s: str, limit: int) -> bool:
    if len(s) > limit or "\x00" in s:
        return False
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: small key sets of free-form dicts found valid: a fleet's agents write the same few over and
#: over, and a set lookup costs less than checking each key (cleared when full; bounded in
#: memory by _GOOD_KEYS_MAX x _GOOD_KEYS_LEN keys of at most MAX_KEY_CHARS)
_good_keys: set[tuple[str, ...]] = set()
_GOOD_KEYS_MAX = 1024
_GOOD_KEYS_LEN = 16
_INT64_MIN = -INT64_MAX - 1


def _keys_ok(keys: tuple[Any, ...]) -> bool:
    for k in keys:
        if type(k) is not str or not _text_ok(k, MAX_KEY_CHARS):
            return False
    if len(keys) <= _GOOD_KEYS_LEN:
        if len(_good_keys) >= _GOOD_KEYS_MAX:
            _good_keys.clear()
        _good_keys.add(keys)
    return True


def _json_ok(value: Any, max_depth: int, max_values: int) -> bool:
    """The fast path of :func:`_check_json`: True when ``value`` passes, without building the
    paths an error message needs (the hub validates every window's metrics: ~80 values).
    False means "not sure": the caller walks again, value by value, to say what is wrong."""
    if type(value) is not dict:
        return False
    count = 1
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    isfinite = math.isfinite
    while stack:
        container, depth = pop()
        if depth > max_depth:
            return False
        count += len(container)
        if count > max_values:
            return False
        if type(container) is dict:
            keys = tuple(container)
            if keys not in _good_keys and not _keys_ok(keys):
                return False
            items = container.values()
        else:
            items = container
        for v in items:
            t = type(v)
            if t is int:
                if not _INT64_MIN <= v <= INT64_MAX:
                    return False
            elif t is float:
                if not isfinite(v):
                    return False
            elif t is str:
                if not _text_ok(v, MAX_TEXT_CHARS):
                    return False
            elif t is dict or t is list:
                push((v, depth + 1))
            elif v is not None and t is not bool:
                return False
    return True


def _check_json(value: dict[str, Any], limits: tuple[int, int]) -> dict[str, Any]:
    """Check that ``value`` is a JSON object within (depth, values) ``limits``, iteratively."""
    if not _json_ok(value, *limits):
        _explain_json(value, limits)  # something is wrong: say what and where
    return value


def _explain_json(value: Any, limits: tuple[int, int]) -> None:
    """The walk behind :func:`_check_json`'s refusals: value by value, building paths;
    ValueError for the first thing wrong (none: :func:`_json_ok` was only unsure)."""
    max_depth, max_values = limits
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    count = 1
    while stack:
        v, path, depth = stack.pop()
        at = f"at {path.lstrip('.')}: " if path else ""
        if isinstance(v, dict | list):
            if depth > max_depth:
                raise ValueError(f"{at}nested {depth} levels deep, at most {max_depth} allowed")
            count += len(v)
            if count > max_values:
                raise ValueError(f"holds more than {max_values} values, at most {max_values} "
                                 "allowed")
            for k, item in v.items() if isinstance(v, dict) else enumerate(v):
                if isinstance(v, dict):
                    if not isinstance(k, str):
                        raise ValueError(f"{at}key {k!r} is not a string")
                    _check_text(k, MAX_KEY_CHARS, f"{at}key")
                stack.append((item, f"{path}.{_printable(k)}", depth + 1))
        elif isinstance(v, str):
            _check_text(v, MAX_TEXT_CHARS, f"{at}string")
        elif v is None or isinstance(v, bool):
            pass
        elif isinstance(v, int):
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise ValueError(f"{at}integer {v} does not fit in 64 bits")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{at}{v} is not a finite number (use null)")
        else:
            raise ValueError(f"{at}{type(v).__name__} {v!r:.40} is not a JSON value")


def _printable(key: object) -> str:
    """A key as it may appear in an error path: control characters escaped (a NUL in a reason
    stored at the hub would fail on PostgreSQL text columns)."""
    text = str(key)
    return text if text.isprintable() else repr(text)[1:-1]


def _check_text(s: str, limit: int, what: str = "string") -> str:
    if len(s) > limit:
        raise ValueError(f"{what} of {len(s)} characters, at most {limit} allowed")
    if "\x00" in s:
        raise ValueError(f"{what} contains a NUL character, which text may not hold")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid UTF-8 text ({err.reason})") from None
    return s


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
    _check_text(v, MAX_SAMPLE_CHARS, "inputs")
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
Text = Annotated[str, AfterValidator(partial(_check_text, limit=MAX_TEXT_CHARS))]
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
Metrics = Annotated[dict[str, Any], AfterValidator(partial(_check_json, limits=METRICS_LIMITS))]
Detail = Annotated[dict[str, Any], AfterValidator(partial(_check_json, limits=DETAIL_LIMITS))]
Args = Annotated[dict[str, Any], AfterValidator(partial(_check_json, limits=ARGS_LIMITS))]
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
    """Fields every message has; the size limits :func:`encode` and :func:`decode` apply."""

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
        return COMMAND_SIGNING_CONTEXT + _canonical_json(data)

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
M = TypeVar("M", bound=BaseMessage)
MESSAGE_TYPES: Mapping[topics.Kind, type[BaseMessage]] = {
    "telemetry": TelemetryEnvelope, "state": StateMessage, "receipt": Receipt, "cmd": Command,
    "ack": Ack,
}


def _canonical_json(data: Any) -> bytes:
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError) as err:  # UnicodeEncodeError is a ValueError
        raise MessageError(f"message does not encode as JSON: {err}") from err


def encode(msg: BaseMessage) -> bytes:
    """The wire bytes of ``msg`` (see the module docstring); MessageError if over its limits."""
    raw = _canonical_json(msg.model_dump(mode="json"))
    name = type(msg).__name__
    if len(raw) > msg.MAX_JSON_BYTES:
        raise MessageError(f"{name} is {len(raw)} bytes of JSON, at most {msg.MAX_JSON_BYTES} "
                           "allowed: send fewer items per message")
    if len(raw) > COMPRESS_ABOVE:
        packed = zlib.compress(raw, COMPRESS_LEVEL)
        if len(packed) < len(raw):
            raw = packed
    if len(raw) > msg.MAX_WIRE_BYTES:
        raise MessageError(f"{name} is {len(raw)} bytes on the wire, at most "
                           f"{msg.MAX_WIRE_BYTES} allowed: send fewer items per message")
    return raw


_STREAM_ID = re.compile(r"[0-9a-f]{16}")
_MAX_FLOAT = sys.float_info.max


def _plain_device_id(device_id: str) -> bool:
    try:
        topics.check_device_id(device_id)  # ASCII letters, digits, "-", "_", ".": no escapes
    except ProtocolError:
        return False
    return True


def encode_receipt(device_id: str, stream: str, up_to_seq: int, ts: float) -> bytes:
    """``encode(Receipt(device_id=..., stream=..., up_to_seq=..., ts=...))``, the same bytes
    (a test holds them equal), without building and dumping the model: the hub sends one
    receipt per device and stream of every batch. Values not in their plain valid form (a
    float ``ts``, an int ``up_to_seq``, a valid device id: none that JSON escapes) take the
    model's path, with its errors."""
    if (type(ts) is float and 0.0 <= ts <= _MAX_FLOAT and type(up_to_seq) is int
            and 0 <= up_to_seq <= INT64_MAX and type(stream) is str
            and _STREAM_ID.fullmatch(stream) is not None and type(device_id) is str
            and _plain_device_id(device_id)):
        return b'{"device_id":"%s","protocol":1,"stream":"%s","ts":%s,"up_to_seq":%d}' % (
            device_id.encode("ascii"), stream.encode("ascii"), float.__repr__(ts).encode(),
            up_to_seq)
    return encode(Receipt(device_id=device_id, stream=stream, up_to_seq=up_to_seq, ts=ts))


#: a second decoder of one model's JSON text (see :func:`decode`)
FastDecoder = Callable[[bytes], BaseMessage | None]


def decode(data: bytes | bytearray | memoryview, model_type: type[M], *,
           max_bytes: int | None = None, max_json_bytes: int | None = None,
           fast: FastDecoder | None = None) -> M:
    """Validate wire bytes as ``model_type``; MessageError naming what is wrong.

    ``max_bytes`` and ``max_json_bytes`` default to the model's ``MAX_WIRE_BYTES`` and
    ``MAX_JSON_BYTES``. The size is checked before anything else is read.

    ``fast``: a quicker decoder of the JSON text (after the size, first byte and inflate
    checks) that returns a model only when the model's own validation would return an equal
    one, and None whenever it is not sure; then the model validates, and says what is wrong.
    The hub passes one for telemetry (:mod:`cloud_hub.envelope_fast`).
    """
    name = model_type.__name__
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"{name} payload must be bytes, got {type(data).__name__}")
    limit = model_type.MAX_WIRE_BYTES if max_bytes is None else max_bytes
    json_limit = model_type.MAX_JSON_BYTES if max_json_bytes is None else max_json_bytes
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limit:
        raise MessageError(f"{name} payload of {size} bytes is over the {limit} bytes allowed; "
                           "refused unread")
    if size == 0:
        raise MessageError(f"{name} payload is empty")
    raw = bytes(data)
    if raw[0] == _ZLIB_FIRST:
        raw = _inflate(raw, json_limit, name)
    elif raw[0] != _JSON_FIRST:
        raise MessageError(f"{name} payload starts with byte 0x{raw[0]:02X}: expected '{{' "
                           "(plain JSON) or 0x78 (zlib)")
    elif size > json_limit:
        raise MessageError(f"{name} JSON of {size} bytes is over the {json_limit} bytes allowed")
    if fast is not None:
        quick = fast(raw)
        if quick is not None:
            if not isinstance(quick, model_type):
                raise TypeError(f"fast decoder {fast!r} returned a {type(quick).__name__} "
                                f"for a {name}")
            return quick
    try:
        msg = model_type.model_validate_json(raw, strict=True)
    except ValidationError as err:
        text, field = _error_text(err)
        raise MessageError(text, field) from err
    if "protocol" not in msg.model_fields_set:  # the default is for Python callers only
        raise MessageError(f"protocol: missing; every payload names its protocol "
                           f"({PROTOCOL_VERSION} here)", "protocol")
    return msg


def _load_isal() -> Any:
    """ISA-L's zlib module when installed (the hub extra installs it; see _inflate)."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - the core install has only the standard library's
        return None
    return isal_zlib


_isal_zlib: Any = _load_isal()


def _inflate(data: bytes, limit: int, name: str) -> bytes:
    """The JSON inside a zlib payload, at most ``limit`` bytes of it; MessageError else.

    ISA-L (python-isal, the hub's extra) inflates the same streams in ~60% of zlib's time (the
    hub inflates every envelope: ~5 µs of ~115 per message, measured). Its result is taken
    only when it is the clean case (a whole stream, its checksum checked, nothing after it,
    within the limit); anything else is inflated again by zlib, whose outcome and words the
    errors keep (tests/cloud_hub/test_inflate.py holds the two equal)."""
    if _isal_zlib is not None:
        fast = _isal_zlib.decompressobj()
        try:
            out: bytes = fast.decompress(data, limit + 1)
        except _isal_zlib.error:
            pass
        else:
            if fast.eof and not fast.unused_data and len(out) <= limit:
                return out
    return _zlib_inflate(data, limit, name)


def _zlib_inflate(data: bytes, limit: int, name: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)  # never more than one byte past the limit
    except zlib.error as err:
        raise MessageError(f"{name} payload is not valid zlib data: {err}") from err
    if len(out) > limit:
        raise MessageError(f"{name} payload inflates to more than the {limit} bytes of JSON "
                           "allowed; refused (a zip bomb, or a message the sender must split)")
    if not inflater.eof:
        raise MessageError(f"{name} payload is a truncated zlib stream")
    if inflater.unused_data:
        raise MessageError(f"{name} payload has {len(inflater.unused_data)} bytes after its "
                           "zlib stream")
    return out


def decode_for_topic(topic: str, data: bytes | bytearray | memoryview, *,
                     parsed: tuple[str, topics.Kind] | None = None,
                     fast: FastDecoder | None = None) -> BaseMessage:
    """Decode a payload received on ``topic`` as that topic's model.

    Also checks that the message names the device its topic names: broker ACLs guard topics,
    so a device could otherwise speak for another one inside its own topic. ``parsed``:
    ``topics.parse(topic)``, when the caller has it already (the hub, for every message).
    ``fast``: see :func:`decode`.
    """
    device, kind = topics.parse(topic) if parsed is None else parsed
    msg = decode(data, MESSAGE_TYPES[kind], fast=fast)
    if msg.device_id != device:
        raise MessageError(f"device_id {msg.device_id!r} differs from the topic's device "
                           f"{device!r} ({topic})", "device_id")
    return msg


def _error_text(err: ValidationError) -> tuple[str, str]:
    raw = err.errors(include_url=False)
    # a tuple whose bad item was dropped is also "too short": an echo of that item's error
    errors = [e for e in raw if not (e["type"] == "too_short" and any(
        o["loc"][: len(e["loc"])] == e["loc"] and o["loc"] != e["loc"] for o in raw))]
    errors.sort(key=lambda e: e["loc"][:1] != ("protocol",))
    first = errors[0]
    loc = first["loc"]
    # drop the discriminator tag pydantic puts after an item index: items.0.window.rows
    parts = [_printable(p) for i, p in enumerate(loc)
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


def envelope_key(data: bytes | bytearray | memoryview) -> tuple[str, int, str] | None:
    """(stream, seq, message_id) of a telemetry payload that did not validate, read loosely, or
    None: only within the envelope's size limits, only from JSON, only when the three fields
    have their valid forms. The hub uses it to mark a refused seq so the stream goes on."""
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if not 0 < size <= TelemetryEnvelope.MAX_WIRE_BYTES:
        return None
    raw = bytes(data)
    try:
        if raw[0] == _ZLIB_FIRST:
            raw = _inflate(raw, TelemetryEnvelope.MAX_JSON_BYTES, "TelemetryEnvelope")
        elif raw[0] != _JSON_FIRST or size > TelemetryEnvelope.MAX_JSON_BYTES:
            return None
        doc = json.loads(raw)
    except (MessageError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    stream, seq, message_id = doc.get("stream"), doc.get("seq"), doc.get("message_id")
    if not (isinstance(stream, str) and re.fullmatch(r"[0-9a-f]{16}", stream)
            and type(seq) is int and 1 <= seq <= INT64_MAX and isinstance(message_id, str)
            and re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                             message_id)):
        return None
    return stream, seq, message_id


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
        text, field = _error_text(err)
        raise MessageError(text, field) from err


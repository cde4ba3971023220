"""The bytes protocol v1 messages travel as: encode, decode, and the checks before any
parsing.

The models are :mod:`fleet_protocol.messages`; this module turns them into payloads and back.

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
and its score in 16 bins (89 B), and the metrics the agent writes (701 B of JSON: latency
histogram, confusion matrix, counters; the per-feature missing and out-of-range counts are in
the input sketch, not repeated)::

    encoded envelope          plain JSON 2,851 B    zlib (what is sent) 1,751 B
    the same rows as CSV      447,525 B (16 columns, 7 significant digits, one header line)
    ratio raw CSV / sent      256x

So one 5-minute window at 10/s is ~4x short of the 1000x target: a sketch costs the same
whatever it summarises (half the input sketch is its 16 x 40 B float64 moments), so only traffic
per window moves the ratio. Measured before the metrics stopped repeating the per-feature counts
(~90 B more per window): 12 windows of an hour in one envelope 14,182 B (381x); one hourly
window 1,973 B (2,722x); 5-minute windows at 100/s 1,966 B each (2,277x).
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from fleet_protocol import topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.json_values import INT64_MAX
from fleet_protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    BaseMessage,
    MessageError,
    Receipt,
    TelemetryEnvelope,
    canonical_json,
    error_text,
)

__all__ = ["COMPRESS_ABOVE", "COMPRESS_LEVEL", "FastDecoder", "decode", "decode_for_topic",
           "encode", "encode_receipt", "envelope_key"]

COMPRESS_ABOVE = 1024
COMPRESS_LEVEL = 6
_ZLIB_FIRST = 0x78
_JSON_FIRST = ord("{")
M = TypeVar("M", bound=BaseMessage)


def encode(msg: BaseMessage) -> bytes:
    """The wire bytes of ``msg`` (see the module docstring); MessageError if over its limits."""
    raw = canonical_json(msg.model_dump(mode="json"))
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
        text, field = error_text(err)
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

"""A second decoder for the message the hub takes most: a telemetry envelope of windows.

:func:`decode_envelope` reads the JSON text of a :class:`~fleet_protocol.messages.
TelemetryEnvelope` whose items are all windows in one msgspec pass, the window metrics
included, and returns the same model the pydantic validation would (built from the values it
checked, as ``model_construct`` builds one), or None whenever it is not sure — then the model
validates the text itself and says what is wrong (:func:`fleet_protocol.wire.decode`, its
``fast`` argument). So the hub's answers, errors and rejection kinds are the model's; only
the accepted path is quicker.

Why: validating an envelope was the larger part of the hub's CPU per message (measured with
``edgefleet bench hub``: ~50 of ~115 µs; one window's metrics alone ~28 µs: pydantic building
~100 values as Python objects, then the iterative walk of :func:`fleet_protocol.json_values.
check_json`). msgspec checks the same values in C against a metrics type unrolled to the
depth limit (no recursive schema: FIELD-NOTES, "Security facts").

What it checks, field by field, is what the model checks (the patterns are the model's own,
read from its fields, so the two cannot drift; tests/cloud_hub/test_envelope_fast.py holds
the results equal on valid, mutated and hostile envelopes). Where it cannot tell cheaply, it
says "not sure":

- any ``\\u`` escape in the text (the only way JSON spells a NUL or a lone surrogate, which
  the model refuses in metrics; the agent writes none);
- a text of ``2 * max values - 1`` bytes (39,999) or more: below that, no metrics can hold
  more values than allowed (every value takes a byte and a separator); an envelope of a dozen
  windows or more takes the model's path;
- any item that is not a window, any msgspec error (strict JSON, unknown or missing fields,
  wrong types, numbers out of range), any value the model would refuse.

Without msgspec installed (it comes with the hub extra) :func:`decode_envelope` is None, and
the model does all the work.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel

from fleet_protocol import codec, topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.json_values import INT64_MAX, MAX_KEY_CHARS, MAX_TEXT_CHARS
from fleet_protocol.manifest import parse_semver
from fleet_protocol.messages import (
    MAX_ITEMS,
    MAX_SKETCH_BYTES,
    METRICS_LIMITS,
    PROTOCOL_VERSION,
    TelemetryEnvelope,
    WindowItem,
)

__all__ = ["decode_envelope", "field_pattern"]


def field_pattern(model: type[Any], name: str) -> re.Pattern[str]:
    """The ``pattern`` constraint of a model's string field, compiled for ``fullmatch``
    (pydantic's Rust regex anchors ``$`` at the very end; Python's ``$`` would also match
    before a final newline, so the anchors are dropped and the whole string matched)."""
    for meta in model.model_fields[name].metadata:
        pattern = getattr(meta, "pattern", None)
        if pattern is not None:
            if not (pattern.startswith("^") and pattern.endswith("$")):
                raise ValueError(f"{model.__name__}.{name}: pattern {pattern!r} is not "
                                 "anchored with ^...$")
            return re.compile(pattern[1:-1])
    raise ValueError(f"{model.__name__}.{name} has no pattern constraint")


def _max_length(model: type[Any], name: str) -> int:
    for meta in model.model_fields[name].metadata:
        limit = getattr(meta, "max_length", None)
        if limit is not None:
            return int(limit)
    raise ValueError(f"{model.__name__}.{name} has no max_length constraint")


#: base64 characters whose 6 bits end in 4 (before "==") or 2 (before "=") zero bits: the
#: only last characters a canonical encoder writes there
_NO_LOW4 = frozenset(bytes([c]) for c in b"AQgw")
_NO_LOW2 = frozenset(bytes([c]) for c in b"AEIMQUYcgkosw048")

M = TypeVar("M", bound=BaseModel)


def _constructor(model: type[M]) -> Callable[[dict[str, Any]], M]:
    """A model instance from values already validated and every field given, as
    ``model_construct`` builds it (its ``__dict__``, its fields set, no extra, no private
    state) without its per-field loop (~2.5 µs a model). ``model_construct`` itself for a
    model with post-init hooks or private attributes, which this does not run."""
    if model.__pydantic_post_init__ is not None or model.__private_attributes__ \
            or model.__pydantic_root_model__:
        return lambda values: model.model_construct(**values)
    new, setattr_ = model.__new__, object.__setattr__
    names = frozenset(model.model_fields)

    def construct(values: dict[str, Any]) -> M:
        m = new(model)
        setattr_(m, "__dict__", values)
        setattr_(m, "__pydantic_fields_set__", set(names))
        setattr_(m, "__pydantic_extra__", None)
        setattr_(m, "__pydantic_private__", None)
        return m

    return construct


def _build() -> Callable[[bytes], TelemetryEnvelope | None] | None:
    try:
        import msgspec
        from msgspec import Meta
    except ImportError:  # pragma: no cover - the hub extra installs it
        return None

    int64 = Annotated[int, Meta(ge=-INT64_MAX - 1, le=INT64_MAX)]
    text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
    key = Annotated[str, Meta(max_length=MAX_KEY_CHARS)]
    max_depth, _ = METRICS_LIMITS
    # what a container at depth d may hold (the metrics object is depth 1): containers only
    # down to max_depth, as json_values.check_json counts them
    values: Any = int64 | float | text | bool | None
    for _ in range(max_depth - 1):
        values = int64 | float | text | bool | None | list[values] | dict[key, values]
    window_type: Any = msgspec.defstruct(
        "Window", [("model_name", str), ("model_version", str),
                   ("slot", Literal["blue", "green"]), ("start", float), ("end", float),
                   ("layout", str), ("inputs", msgspec.Raw), ("outputs", msgspec.Raw),
                   ("metrics", dict[key, values]),
                   ("rows", Annotated[int, Meta(ge=0, le=INT64_MAX)])],
        tag_field="kind", tag="window", forbid_unknown_fields=True)
    # the other item kinds: decoded only to be told apart (then "not sure"); a tagged struct
    # alone does not require its tag, a union of them does (as the model's discriminator)
    event_type: Any = msgspec.defstruct("EventItem", [], tag_field="kind", tag="event")
    sample_type: Any = msgspec.defstruct("SampleItem", [], tag_field="kind", tag="sample")
    envelope_type: Any = msgspec.defstruct(
        "Envelope", [("protocol", Literal[1]),  # required: decode() refuses it omitted
                     ("device_id", str), ("stream", str), ("message_id", str),
                     ("seq", Annotated[int, Meta(ge=1, le=INT64_MAX)]), ("sent_at", float),
                     ("agent_version", str),
                     ("items", tuple[window_type | event_type | sample_type, ...])],
        forbid_unknown_fields=True)

    # the twin must know every field of the models, no more: a field added to one of them
    # makes every envelope "not sure" until it is added here too (and a test fails)
    if (set(envelope_type.__struct_fields__) != set(TelemetryEnvelope.model_fields)
            or {"kind", *window_type.__struct_fields__} != set(WindowItem.model_fields)):
        return None

    decoder = msgspec.json.Decoder(envelope_type)
    base64_decoder = msgspec.json.Decoder(bytes)
    decode_error = msgspec.DecodeError
    stream_re = field_pattern(TelemetryEnvelope, "stream").fullmatch
    message_id_re = field_pattern(TelemetryEnvelope, "message_id").fullmatch
    agent_re = field_pattern(TelemetryEnvelope, "agent_version").fullmatch
    name_re = field_pattern(WindowItem, "model_name").fullmatch
    layout_re = field_pattern(WindowItem, "layout").fullmatch
    version_chars = _max_length(WindowItem, "model_version")
    size_limit = 2 * METRICS_LIMITS[1] - 1
    isfinite = math.isfinite
    make_window = _constructor(WindowItem)
    make_envelope = _constructor(TelemetryEnvelope)

    def sketch(token: Any, fingerprint: str) -> bytes | None:
        """The bytes of a sketch's JSON string token (base64), as SketchBytes validates them:
        canonical standard base64 (msgspec checks the alphabet and the padding, not that the
        bits the padding drops are zero: checked here on the text), the size, then the
        header the model validator checks."""
        text = bytes(token)
        if b"\\" in text or not text.startswith(b'"'):
            return None  # an escape (JSON may spell "/" as "\\/"), or not a string at all
        if text.endswith(b'=="'):
            if text[-4:-3] not in _NO_LOW4:
                return None
        elif text.endswith(b'="') and text[-3:-2] not in _NO_LOW2:
            return None
        try:
            data: bytes = base64_decoder.decode(text)
        except (decode_error, ValueError, RecursionError):
            return None
        if not codec.HEADER_BYTES <= len(data) <= MAX_SKETCH_BYTES or data[0] != codec.MAGIC \
                or data[2:codec.HEADER_BYTES].hex() != fingerprint:
            return None
        return data

    def window(w: Any) -> WindowItem | None:
        start, end, layout, version = w.start, w.end, w.layout, w.model_version
        if not (isfinite(start) and isfinite(end) and 0.0 <= start < end
                and name_re(w.model_name) and layout_re(layout)
                and len(version) <= version_chars):
            return None
        try:
            parse_semver(version)
        except (ProtocolError, ValueError):
            return None
        inputs = sketch(w.inputs, layout[:16])
        outputs = sketch(w.outputs, layout[17:])
        if inputs is None or outputs is None:
            return None
        return make_window({
            "kind": "window", "model_name": w.model_name, "model_version": version,
            "slot": w.slot, "start": start, "end": end, "layout": layout, "inputs": inputs,
            "outputs": outputs, "metrics": w.metrics, "rows": w.rows})

    def decode_envelope(raw: bytes) -> TelemetryEnvelope | None:
        """The envelope of the JSON text ``raw``, as the model would validate it; None when
        not sure (see the module docstring)."""
        # (a backslash first: memchr; the two-byte search costs ~3 µs on base64 text)
        if len(raw) >= size_limit or (b"\\" in raw and b"\\u" in raw):
            return None
        try:
            env = decoder.decode(raw)
        except (decode_error, ValueError, RecursionError):
            # msgspec's own; UnicodeDecodeError (bad UTF-8); RecursionError (arrays nested
            # thousands deep where a sketch belongs: skipped, not typed, so not bounded)
            return None
        sent_at = env.sent_at
        if not (1 <= len(env.items) <= MAX_ITEMS and isfinite(sent_at) and sent_at >= 0.0
                and stream_re(env.stream) and message_id_re(env.message_id)
                and agent_re(env.agent_version)):
            return None
        try:
            topics.check_device_id(env.device_id)
        except ProtocolError:
            return None
        items = []
        for w in env.items:
            if type(w) is not window_type:
                return None
            item = window(w)
            if item is None:
                return None
            items.append(item)
        return make_envelope({
            "protocol": PROTOCOL_VERSION, "device_id": env.device_id, "stream": env.stream,
            "message_id": env.message_id, "seq": env.seq, "sent_at": sent_at,
            "agent_version": env.agent_version, "items": tuple(items)})

    return decode_envelope


#: None without msgspec (then the model validates every envelope)
decode_envelope: Callable[[bytes], TelemetryEnvelope | None] | None = _build()

"""cloud_hub.envelope_fast: the hub's second decoder of telemetry envelopes returns the model's
own result or says "not sure" (None), on valid, mutated and hostile JSON texts alike."""

from __future__ import annotations

import copy
import json
import zlib
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cloud_hub import ingest
from cloud_hub.envelope_fast import decode_envelope, field_pattern
from fleet_protocol import messages as msgs
from fleet_protocol import wire
from fleet_protocol.messages import TelemetryEnvelope, WindowItem
from tests.cloud_hub import fleet


@cache
def _base_text() -> bytes:
    """One envelope as the agent sends it: a closed window of 16 features with the agent's
    full metrics (the benchmark's message), as JSON text."""
    from edgefleet.bench_hub import make_envelopes

    return zlib.decompress(make_envelopes(1, 1)[0][1])


def _base_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_base_text())
    return doc


def _text(doc: Any, *, sort: bool = True, spaces: bool = False) -> bytes:
    try:
        text = json.dumps(doc, sort_keys=sort, ensure_ascii=False,
                          separators=(", ", ": ") if spaces else (",", ":"))
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON spells it as an escape
        return json.dumps(doc, sort_keys=sort).encode("ascii")


def _model(raw: bytes) -> TelemetryEnvelope | None:
    """What the model makes of the JSON text (None: refused), as wire.decode runs it."""
    try:
        msg = TelemetryEnvelope.model_validate_json(raw, strict=True)
    except ValidationError:
        return None
    return msg if "protocol" in msg.model_fields_set else None


def _agrees(raw: bytes) -> TelemetryEnvelope | None:
    """Assert that the fast decoder says "not sure" or returns exactly the model's envelope
    (same values of the same types, same fields set); its result."""
    assert decode_envelope is not None
    fast = decode_envelope(raw)
    if fast is None:
        return None
    slow = _model(raw)
    assert slow is not None, f"accepted what the model refuses: {raw[:400]!r}"
    assert fast == slow
    # == holds for 1 == 1.0 == True: the JSON of each tells the types apart
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set
    for a, b in zip(fast.items, slow.items, strict=True):
        assert type(a) is type(b) and a.model_fields_set == b.model_fields_set
        assert isinstance(a, WindowItem) and isinstance(b, WindowItem)
        assert (type(a.start), type(a.end)) == (type(b.start), type(b.end)) == (float, float)
    assert type(fast.sent_at) is type(slow.sent_at) is float
    return fast


def _with(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document (its values, nested ones included)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def test_the_fast_path_is_on() -> None:
    """msgspec comes with the hub extra, and the decoder knows every field of the models (a
    field added to one of them turns it off: then this fails)."""
    assert decode_envelope is not None
    assert wire._isal_zlib is not None  # the hub extra's inflate


def test_an_agent_envelope_decodes_fast_to_the_models_envelope() -> None:
    """The agent's message takes the fast path, and gives the model's result."""
    assert _agrees(_base_text()) is not None
    # any spelling of the same document: key order, spaces, escapes the agent does not write
    doc = _base_doc()
    assert _agrees(_text(doc, sort=False)) is not None
    assert _agrees(_text(doc, spaces=True)) is not None


def test_the_hub_ingests_through_it() -> None:
    """decode_batch hands telemetry to it: a valid envelope is stored the same way."""
    topic = "edgefleet/v1/bench-0000/telemetry"
    valid, rejected = ingest.decode_batch([(topic, zlib.compress(_base_text()))])
    assert rejected == [] and valid == [_model(_base_text())]


VALID_CHANGES: dict[str, tuple[tuple[Any, ...], Any]] = {
    "integer sent_at": (("sent_at",), 5),
    "integer start": (("items", 0, "start"), 0),
    "negative zero start": (("items", 0, "start"), -0.0),
    "metrics at the depth limit": (("items", 0, "metrics"),
                                   {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}),
    "lists at the depth limit": (("items", 0, "metrics"), {"a": [[[[[1, "x", None]]]]]}),
    "metrics of every type": (("items", 0, "metrics"),
                              {"i": -(2**63), "j": 2**63 - 1, "f": 1e308, "t": True,
                               "n": None, "s": "é" * 1024, "k" * 256: [], "u": "😀" * 3}),
    "newline in a metrics string": (("items", 0, "metrics"), {"s": "a\nb\"c\\"}),
    "largest seq": (("seq",), 2**63 - 1),
    "longest model version": (("items", 0, "model_version"), "1.0.0-" + "a" * 122),
}


@pytest.mark.parametrize("change", VALID_CHANGES)
def test_valid_envelopes_take_the_fast_path(change: str) -> None:
    """Values at the edges of what the model accepts are accepted here too."""
    path, value = VALID_CHANGES[change]
    assert _agrees(_text(_with(_base_doc(), path, value))) is not None


INVALID_CHANGES: dict[str, tuple[tuple[Any, ...], Any]] = {
    "protocol 2": (("protocol",), 2),
    "float seq": (("seq",), 5.0),
    "seq 0": (("seq",), 0),
    "seq past int64": (("seq",), 2**63),
    "negative sent_at": (("sent_at",), -1.0),
    "stream with a newline": (("stream",), "5eed5eed5eed5eed\n"),
    "upper-case message id": (("message_id",), "A" * 8 + "-0000-0000-0000-" + "0" * 12),
    "device id with a space": (("device_id",), "pi 1"),
    "no items": (("items",), []),
    "end at start": (("items", 0, "end"), 1767225900.0),
    "no sketch": (("items", 0, "inputs"), ""),
    "sketch not canonical": (("items", 0, "outputs"), "QUF="),
    "sketch of another layout": (("items", 0, "layout"), "0" * 16 + "/" + "1" * 16),
    "model version not semver": (("items", 0, "model_version"), "1.0"),
    "model version too long": (("items", 0, "model_version"), "1.0.0-" + "a" * 123),
    "slot red": (("items", 0, "slot"), "red"),
    "negative rows": (("items", 0, "rows"), -1),
    "kind event": (("items", 0, "kind"), "event"),
    "metrics a list": (("items", 0, "metrics"), [1]),
    "metrics too deep": (("items", 0, "metrics"), {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}),
    "lists too deep": (("items", 0, "metrics"), {"a": [[[[[[1]]]]]]}),
    "metrics integer past int64": (("items", 0, "metrics"), {"x": 2**63}),
    "metrics string too long": (("items", 0, "metrics"), {"x": "é" * 1025}),
    "metrics key too long": (("items", 0, "metrics"), {"k" * 257: 1}),
    "metrics NUL": (("items", 0, "metrics"), {"x": "a\x00b"}),
    "metrics NUL in a key": (("items", 0, "metrics"), {"a\x00": 1}),
    "metrics lone surrogate": (("items", 0, "metrics"), {"x": "\ud800"}),
    "metrics too many values": (("items", 0, "metrics"), {"x": [0] * 20_001}),
    "extra field": (("extra",), 1),
    "extra item field": (("items", 0, "extra"), 1),
}


@pytest.mark.parametrize("change", INVALID_CHANGES)
def test_what_the_model_refuses_is_never_accepted(change: str) -> None:
    """Every refusal stays the model's: the fast decoder says "not sure"."""
    path, value = INVALID_CHANGES[change]
    raw = _text(_with(_base_doc(), path, value))
    assert _model(raw) is None
    assert _agrees(raw) is None


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_protocol_equal_to_1_but_not_1_is_refused(version: Any) -> None:
    """JSON ``true`` and ``1.0`` equal 1 in Python (a plain ``Literal[1]`` took them): both
    decoders refuse them; the fast one is "not sure", so the model refuses them in words."""
    raw = _text(_with(_base_doc(), ("protocol",), version))
    assert _model(raw) is None and _agrees(raw) is None


@pytest.mark.parametrize("key", ["protocol", "seq", "items"])
def test_a_missing_field_is_never_accepted(key: str) -> None:
    doc = _base_doc()
    del doc[key]
    assert _agrees(_text(doc)) is None


@pytest.mark.parametrize("depth", [100, 10_000])
def test_arrays_nested_deep_where_a_sketch_belongs(depth: int) -> None:
    """msgspec skips a value it does not type (a sketch's token) by recursion: refused by the
    model, "not sure" here, never an exception."""
    doc = _base_doc()
    raw = _text(doc).replace(json.dumps(doc["items"][0]["inputs"]).encode(),
                             b"[" * depth + b"]" * depth)
    assert _model(raw) is None and _agrees(raw) is None


def test_a_missing_item_kind_is_never_accepted() -> None:
    doc = _base_doc()
    del doc["items"][0]["kind"]
    assert _agrees(_text(doc)) is None


NUMBERS = ["0", "-0", "-0.0", "1e3", "1E+3", "1e-400", "1e400", "-1e400", "01", "1.", ".5",
           "+1", "0.1000000000000000055511151231257827", "4.9e-324", "2.2250738585072014e-308",
           "9223372036854775807", "9223372036854775808", "-9223372036854775808",
           "-9223372036854775809", "18446744073709551616", "1" * 40, "1" * 40 + ".5",
           "NaN", "Infinity", "-Infinity", "true", "null", '"1"']


@pytest.mark.parametrize("number", NUMBERS)
@pytest.mark.parametrize("field", ["sent_at", "seq", "start", "rows", "metric"])
def test_numbers_spelt_any_way(field: str, number: str) -> None:
    """Every spelling of a number, valid JSON or not, in a float, an int and a metric."""
    doc = _base_doc()
    marker = 123456.789
    if field == "metric":
        doc["items"][0]["metrics"]["x"] = marker
    elif field in ("start", "rows"):
        doc["items"][0][field] = marker
    else:
        doc[field] = marker
    _agrees(_text(doc).replace(b"123456.789", number.encode()))


def test_the_errors_stay_the_models() -> None:
    """A refused envelope is reported with the model's words and field."""
    raw = _text(_with(_base_doc(), ("items", 0, "metrics"), {"x": "a\x00b"}))
    with pytest.raises(msgs.MessageError) as fast:
        wire.decode(raw, TelemetryEnvelope, fast=decode_envelope)
    with pytest.raises(msgs.MessageError) as slow:
        wire.decode(raw, TelemetryEnvelope)
    assert str(fast.value) == str(slow.value) and fast.value.field == slow.value.field
    assert "NUL" in str(fast.value)


def test_the_patterns_are_the_models() -> None:
    """Read from the model's fields, matched whole (pydantic's $ is the very end)."""
    stream = field_pattern(TelemetryEnvelope, "stream")
    assert stream.fullmatch("5eed5eed5eed5eed")
    assert not stream.fullmatch("5eed5eed5eed5eed\n")
    with pytest.raises(ValueError, match="no pattern"):
        field_pattern(TelemetryEnvelope, "seq")


json_scalars = (st.none() | st.booleans()
                | st.integers(min_value=-(10**30), max_value=10**30)
                | st.sampled_from([2**63 - 1, -(2**63), 2**63, -(2**63) - 1])
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800"]),
                          max_size=12)
                | st.integers(1020, 1030).map(lambda n: "x" * n))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.integers(250, 260).map(lambda n: "k" * n),
                      inner, max_size=4),
    max_leaves=30)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sort=st.booleans(), spaces=st.booleans())
def test_a_value_replaced_anywhere(data: st.DataObject, sort: bool, spaces: bool) -> None:
    """Any value of the document replaced by any JSON value: the model's result or None."""
    doc = _base_doc()
    path = data.draw(st.sampled_from(_paths(doc)))
    _agrees(_text(_with(doc, path, data.draw(json_values)), sort=sort, spaces=spaces))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(metrics=st.dictionaries(st.text(max_size=8), json_values, max_size=8),
       depth=st.integers(0, 7))
def test_any_metrics(metrics: dict[str, Any], depth: int) -> None:
    """Free-form metrics of any shape, nested up to past the depth limit."""
    for _ in range(depth):
        metrics = {"n": metrics}
    _agrees(_text(_with(_base_doc(), ("items", 0, "metrics"), metrics)))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_key_removed_or_added(data: st.DataObject) -> None:
    doc = _base_doc()
    containers = [p for p in _paths(doc) if isinstance(_get(doc, p), dict)] + [()]
    path = data.draw(st.sampled_from(containers))
    target = _get(doc, path)
    if target and data.draw(st.booleans()):
        del target[data.draw(st.sampled_from(sorted(target)))]
    else:
        target[data.draw(st.text(max_size=12))] = data.draw(json_values)
    _agrees(_text(doc))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_text_damaged(data: st.DataObject) -> None:
    """Bytes of the JSON text cut, changed or added: the model's result or None."""
    raw = bytearray(_base_text())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["cut", "set", "add"]))
        byte = data.draw(st.sampled_from(b'{}[]",:\\/0123456789.eE+-tfnu \n\x00\xc3\xa9xAQ='))
        if op == "cut":
            del raw[i]
        elif op == "set":
            raw[i] = byte
        else:
            raw.insert(i, byte)
    _agrees(bytes(raw))


@settings(max_examples=300)
@given(data=st.data())
def test_any_base64_text_of_a_sketch(data: st.DataObject) -> None:
    """A sketch's base64 with its end changed (padding, its bits, length) or replaced by any
    text of the base64 alphabet: canonical or refused exactly as the model decides."""
    doc = _base_doc()
    real = doc["items"][0]["outputs"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n"
    end = data.draw(st.text(st.sampled_from(alphabet), max_size=6))
    cut = data.draw(st.integers(0, 6))
    text = data.draw(st.sampled_from([real[:len(real) - cut] + end,
                                      data.draw(st.text(st.sampled_from(alphabet),
                                                        max_size=40))]))
    _agrees(_text(_with(doc, ("items", 0, "outputs"), text)))


def test_items_other_than_windows_take_the_models_path() -> None:
    """Events and samples are rare: not sure, the model decodes them."""
    rng = __import__("numpy").random.default_rng(0)
    item, _ = fleet.window("pi-1", 0.0, 10, rng)
    env = fleet.envelope("pi-1", 1, [item, fleet.event()])
    raw = wire.encode(env)
    raw = zlib.decompress(raw) if raw[0] == 0x78 else raw
    assert decode_envelope is not None and decode_envelope(raw) is None
    only_window = wire.encode(fleet.envelope("pi-1", 1, [item]))
    only_window = zlib.decompress(only_window) if only_window[0] == 0x78 else only_window
    assert _agrees(only_window) is not None

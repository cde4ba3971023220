"""MQTT topics, protocol v1 messages and their wire bytes: round trips, bounds, refusals."""

from __future__ import annotations

import base64
import io
import json
import random
import zlib
from typing import Any, cast, get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from pydantic import ValidationInfo

from fleet_protocol import messages as m
from fleet_protocol import topics, wire
from fleet_protocol.errors import ProtocolError
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout

# --- strategies -------------------------------------------------------------------------------

device_ids = st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True).filter(
    lambda s: s not in (".", ".."))
timestamps = st.floats(min_value=0, max_value=1e10)
fingerprints = st.from_regex(r"[0-9a-f]{16}", fullmatch=True)
semvers = st.builds(lambda a, b, c: f"{a}.{b}.{c}", *(st.integers(0, 999),) * 3)
model_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
identifiers = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
agent_versions = st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}", fullmatch=True)
#: any text but NUL, which protocol text may not hold (PostgreSQL text columns cannot)
chars = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])  # valid UTF-8
keys = st.text(chars, max_size=12)
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(chars, max_size=20))


def json_values(depth: int) -> SearchStrategy[Any]:
    """JSON values whose containers nest at most ``depth`` levels."""
    if depth == 0:
        return scalars
    inner = json_values(depth - 1)
    return scalars | st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)


def json_objects(depth: int) -> SearchStrategy[dict[str, Any]]:
    return st.dictionaries(keys, json_values(depth - 1), max_size=4)


@st.composite
def window_items(draw: st.DrawFn) -> m.WindowItem:
    fp_in, fp_out = draw(fingerprints), draw(fingerprints)
    start = draw(st.floats(min_value=0, max_value=1e9))

    def sketch(fp: str) -> bytes:
        return bytes((0xE5, 1)) + bytes.fromhex(fp) + draw(st.binary(max_size=40))

    return m.WindowItem(
        model_name=draw(model_names), model_version=draw(semvers),
        slot=draw(st.sampled_from(["blue", "green"])), start=start,
        end=start + draw(st.floats(min_value=1, max_value=1e6)), layout=f"{fp_in}/{fp_out}",
        inputs=sketch(fp_in), outputs=sketch(fp_out), metrics=draw(json_objects(6)),
        rows=draw(st.integers(0, 2**63 - 1)),
    )


event_items = st.builds(m.EventItem, ts=timestamps,
                        event=st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
                        detail=json_objects(3))
sample_items = st.builds(m.SampleItem, prediction_id=identifiers, ts=timestamps,
                         model_version=semvers,
                         inputs=json_values(2).map(lambda v: json.dumps(v)))
streams = st.from_regex(r"[0-9a-f]{16}", fullmatch=True)
envelopes = st.builds(
    m.TelemetryEnvelope, device_id=device_ids, stream=streams, message_id=st.uuids().map(str),
    seq=st.integers(1, 2**63 - 1), sent_at=timestamps, agent_version=agent_versions,
    items=st.lists(window_items() | event_items | sample_items, min_size=1, max_size=4),
)
slot_infos = st.none() | st.builds(m.SlotInfo, name=model_names, version=semvers,
                                   sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True))
states = st.builds(
    m.StateMessage, device_id=device_ids, online=st.booleans(), agent_version=agent_versions,
    slots=st.builds(m.Slots, blue=slot_infos, green=slot_infos),
    swap_phase=st.sampled_from(get_args(m.SwapPhaseName)), health=json_objects(3), ts=timestamps,
)
receipts = st.builds(m.Receipt, device_id=device_ids, stream=streams,
                     up_to_seq=st.integers(0, 2**63 - 1), ts=timestamps)


@st.composite
def unsigned_commands(draw: st.DrawFn) -> m.UnsignedCommand:
    issued = draw(st.floats(min_value=0, max_value=1e9))
    return m.UnsignedCommand(
        device_id=draw(device_ids), command_id=draw(identifiers), key_id=draw(fingerprints),
        seq=draw(st.integers(1, 2**63 - 1)), issued_at=issued,
        expires_at=issued + draw(st.floats(min_value=1, max_value=1e6)),
        kind=draw(st.sampled_from(get_args(m.CommandKind))), args=draw(json_objects(4)),
    )


commands = st.builds(lambda u, sig: u.signed(sig), unsigned_commands(),
                     st.binary(min_size=64, max_size=64))
acks = st.builds(m.Ack, device_id=device_ids, command_id=identifiers,
                 status=st.sampled_from(get_args(m.AckStatus)), reason=st.text(chars, max_size=200),
                 ts=timestamps)


def layout(n_features: int = 1, bins: int = 16) -> SketchLayout:
    return SketchLayout(tuple(
        FeatureLayout(f"f{j}", "numeric", edges=tuple(np.linspace(0, 1, bins + 1)))
        for j in range(n_features)))


def window(**overrides: Any) -> m.WindowItem:
    lay = layout()
    fields: dict[str, Any] = dict(
        model_name="vib", model_version="1.0.0", slot="blue", start=0.0, end=300.0,
        layout=f"{lay.fingerprint()}/{lay.fingerprint()}", inputs=Sketch.empty(lay).to_bytes(),
        outputs=Sketch.empty(lay).to_bytes(), metrics={"requests": 3}, rows=3)
    fields.update(overrides)
    return m.window_item_from(**fields)


def envelope(items: Any = None, **overrides: Any) -> m.TelemetryEnvelope:
    fields: dict[str, Any] = dict(
        device_id="pi-1", stream="00112233aabbccdd",
        message_id="00000000-0000-4000-8000-000000000000", seq=1,
        sent_at=10.0, agent_version="0.1.0", items=items or (window(),))
    fields.update(overrides)
    return m.TelemetryEnvelope(**fields)


def as_json(msg: m.Message) -> dict[str, Any]:
    return dict(json.loads(wire.encode(msg)) if wire.encode(msg)[:1] == b"{" else
                json.loads(zlib.decompress(wire.encode(msg))))


def refusal(data: bytes | dict[str, Any], model: type[Any] = m.TelemetryEnvelope,
            **kw: Any) -> m.MessageError:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    with pytest.raises(m.MessageError) as info:
        wire.decode(raw, model, **kw)
    return info.value


# --- topics -----------------------------------------------------------------------------------


def test_topic_names() -> None:
    """Each kind has its topic under edgefleet/v1/<device>/."""
    assert topics.PROTOCOL == "edgefleet/v1"
    assert [f("pi-1") for f in (topics.telemetry, topics.state, topics.receipt, topics.cmd,
                                topics.ack)] == [f"edgefleet/v1/pi-1/{k}" for k in topics.KINDS]
    assert topics.device_subscriptions("pi-1") == ("edgefleet/v1/pi-1/receipt",
                                                   "edgefleet/v1/pi-1/cmd")


def test_hub_subscriptions_are_shared() -> None:
    """The hub subscribes to telemetry, state and ack through $share/<group>/."""
    assert topics.hub_subscriptions() == ("$share/hub/edgefleet/v1/+/telemetry",
                                          "$share/hub/edgefleet/v1/+/state",
                                          "$share/hub/edgefleet/v1/+/ack")
    assert topics.hub_subscriptions("archive")[0] == "$share/archive/edgefleet/v1/+/telemetry"
    for bad in ("", "a/b", "+", "#", "x" * 65):
        with pytest.raises(topics.TopicError, match="group"):
            topics.hub_subscriptions(bad)


@given(device_ids, st.sampled_from(topics.KINDS))
def test_parse_inverts_topic(device: str, kind: topics.Kind) -> None:
    """parse() returns the device and kind a topic was built from."""
    assert topics.parse(topics.topic(device, kind)) == (device, kind)


BAD_DEVICE_IDS = ["", "a/b", "a+b", "a#", "$SYS", "a b", "pi\n", "é", "x" * 129, ".", "..",
                  "a\x00"]


@pytest.mark.parametrize("device", [*BAD_DEVICE_IDS, 5, None])
def test_bad_device_ids_refused_in_topics(device: Any) -> None:
    """Topic builders refuse a device id outside 1-128 of [A-Za-z0-9._-] (and '.', '..')."""
    with pytest.raises(ProtocolError, match="device id"):
        topics.telemetry(device)


@pytest.mark.parametrize("name", [
    "edgefleet/v2/pi-1/telemetry", "other/v1/pi-1/telemetry", "edgefleet/v1/pi-1/logs",
    "edgefleet/v1/pi-1/telemetry/x", "edgefleet/v1/pi-1", "edgefleet/v1//telemetry",
    "edgefleet/v1/+/telemetry", "$share/hub/edgefleet/v1/pi-1/telemetry",
    "edgefleet/v1/../state", "/edgefleet/v1/pi-1/state", "", "edgefleet/v1/pi-1/Telemetry",
])
def test_parse_refuses_other_topics(name: str) -> None:
    """parse() raises a ProtocolError for any topic that is not edgefleet/v1/<device>/<kind>."""
    with pytest.raises(ProtocolError):
        topics.parse(name)


# --- round trips ------------------------------------------------------------------------------


def check_round_trip(msg: m.Message) -> None:
    sent_bytes = wire.encode(msg)
    back = wire.decode(sent_bytes, type(msg))
    assert back == msg
    assert wire.encode(back) == sent_bytes


@pytest.mark.parametrize("messages", [envelopes, states, receipts, commands, acks],
                         ids=["envelope", "state", "receipt", "command", "ack"])
@settings(max_examples=60)
@given(data=st.data())
def test_round_trip(messages: SearchStrategy[m.Message], data: st.DataObject) -> None:
    """Any valid message of each type decodes back equal and re-encodes to the same bytes."""
    check_round_trip(data.draw(messages))


def test_real_sketches_survive_the_trip() -> None:
    """Sketch bytes travel as base64 and decode back to the same Sketch."""
    lay = layout(3)
    sk = Sketch.empty(lay)
    sk.update_numeric(0, [0.1, 0.5, 2.0])
    item = window(layout=f"{lay.fingerprint()}/{lay.fingerprint()}", inputs=sk.to_bytes(),
                  outputs=Sketch.empty(lay).to_bytes(), metrics=json.dumps({"rows": 3}))
    back = wire.decode(wire.encode(envelope((item,))), m.TelemetryEnvelope).items[0]
    assert isinstance(back, m.WindowItem)
    assert Sketch.from_bytes(lay, back.inputs) == sk
    assert as_json(envelope((item,)))["items"][0]["inputs"] == base64.b64encode(
        sk.to_bytes()).decode()


def test_offline_state_is_the_last_will() -> None:
    """The last will is offline with no slots or phase; an online state needs a phase."""
    will = m.StateMessage.offline("pi-1", agent_version="0.1.0", ts=5.0)
    assert (will.online, will.swap_phase, will.slots, will.health) == (False, None, m.Slots(), {})
    check_round_trip(will)
    with pytest.raises(ValueError, match="swap_phase"):
        m.StateMessage(device_id="pi-1", online=True, agent_version="0.1.0", ts=1.0)


def test_swap_phases_match_the_agent() -> None:
    """The state's swap phases are exactly the agent's SwapPhase values."""
    from edge_agent.swap_events import SwapPhase

    assert set(get_args(m.SwapPhaseName)) == {p.value for p in SwapPhase}


# --- codec ------------------------------------------------------------------------------------


def ack_of_json_size(n: int) -> m.Ack:
    base = m.Ack(device_id="pi-1", command_id="c", status="ok", reason="", ts=1.0)
    size = len(json.dumps(base.model_dump(mode="json"), separators=(",", ":")))
    return base.model_copy(update={"reason": "r" * (n - size)})


def test_compression_boundary() -> None:
    """JSON of COMPRESS_ABOVE bytes is sent plain, one byte more is zlib, and both decode."""
    at, above = ack_of_json_size(wire.COMPRESS_ABOVE), ack_of_json_size(wire.COMPRESS_ABOVE + 1)
    assert len(wire.encode(at)) == wire.COMPRESS_ABOVE and wire.encode(at)[:1] == b"{"
    assert wire.encode(above)[:1] == b"\x78" and len(wire.encode(above)) < wire.COMPRESS_ABOVE
    assert wire.decode(wire.encode(at), m.Ack) == at
    assert wire.decode(wire.encode(above), m.Ack) == above


def test_oversized_payload_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload over max_bytes is refused on its size alone: no inflating, no JSON parsing."""
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed an oversized payload")

    monkeypatch.setattr(m.TelemetryEnvelope, "model_validate_json", boom)
    monkeypatch.setattr(zlib, "decompressobj", boom)
    limit = m.TelemetryEnvelope.MAX_WIRE_BYTES
    for junk in (b"\x00" * (limit + 1), b"{" * (limit + 1), b"\x78" * (limit + 1)):
        assert "over the 1048576 bytes allowed; refused unread" in str(refusal(junk))
    assert "over the 100 bytes" in str(refusal(b"{" * 101, max_bytes=100))
    assert "over the 1024 bytes" in str(refusal(b"{" * 1025, m.Receipt))


def test_zip_bomb_refused() -> None:
    """A small zlib payload inflating past MAX_JSON_BYTES is refused without inflating it all."""
    bomb = zlib.compress(b"{" + b" " * 50_000_000, 9)
    assert len(bomb) < m.TelemetryEnvelope.MAX_WIRE_BYTES
    assert "inflates to more than the 4194304 bytes" in str(refusal(bomb))
    assert "inflates to more than the 10 bytes" in str(
        refusal(zlib.compress(b"{" + b" " * 20), max_json_bytes=10))


@pytest.mark.parametrize(("payload", "expected"), [
    (b"", "empty"),
    (b"[1]", "starts with byte 0x5B"),
    (b" {}", "starts with byte 0x20"),
    (zlib.compress(b'{"a":1}')[:-3], "truncated zlib"),
    (zlib.compress(b'{"a":1}') + b"xx", "2 bytes after its zlib stream"),
    (b"\x78\x00garbage", "not valid zlib"),
    (b"{not json", "(root): Invalid JSON"),
])
def test_malformed_payloads_refused(payload: bytes, expected: str) -> None:
    """Empty, foreign, truncated or trailing-garbage payloads raise MessageError saying which."""
    assert expected in str(refusal(payload))


def test_encode_refuses_messages_over_the_limits() -> None:
    """encode raises MessageError, asking for fewer items, when a message exceeds its limits."""
    rng = random.Random(0)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1000))
    events = [m.EventItem(ts=1.0, event="log", detail={str(k): noise for k in range(10)})
              for _ in range(m.MAX_ITEMS)]
    with pytest.raises(m.MessageError, match="send fewer items"):
        wire.encode(envelope(events))


def test_decode_for_topic_checks_the_device() -> None:
    """A payload is decoded as its topic's model and must name its topic's device."""
    sent_bytes = wire.encode(envelope())
    assert wire.decode_for_topic("edgefleet/v1/pi-1/telemetry", sent_bytes) == envelope()
    with pytest.raises(m.MessageError, match="differs from the topic's device") as info:
        wire.decode_for_topic("edgefleet/v1/pi-2/telemetry", sent_bytes)
    assert info.value.field == "device_id"
    with pytest.raises(m.MessageError):
        wire.decode_for_topic("edgefleet/v1/pi-1/state", sent_bytes)
    with pytest.raises(topics.TopicError):
        wire.decode_for_topic("edgefleet/v1/pi-1/other", sent_bytes)


# --- validation -------------------------------------------------------------------------------


def test_error_names_field_and_value() -> None:
    """A bad field is named by its dotted path, with the value, the item kind tag left out."""
    data = as_json(envelope())
    data["items"][0]["rows"] = -1
    err = refusal(data)
    assert str(err) == "items.0.rows: Input should be greater than or equal to 0 (got -1)"
    assert err.field == "items.0.rows"


def test_extra_fields_refused_by_name() -> None:
    """An unknown field, at the top or inside an item, is refused with its name."""
    data = as_json(envelope())
    data["priority"] = "high"
    assert str(refusal(data)).startswith("priority: Extra inputs are not permitted (got 'high')")
    data = as_json(envelope())
    data["items"][0]["closed"] = True
    assert refusal(data).field == "items.0.closed"


def test_wrong_protocol_version_refused_first() -> None:
    """protocol 2 is refused first, with an upgrade hint; a payload without protocol too."""
    data = as_json(envelope())
    data["protocol"] = 2
    data["new_field"] = 1
    err = refusal(data)
    assert err.field == "protocol"
    assert "Input should be 1 (got 2); this build speaks protocol 1" in str(err)
    assert "[and 1 more error(s)]" in str(err)
    del data["protocol"], data["new_field"]
    assert str(refusal(data)) == "protocol: missing; every payload names its protocol (1 here)"


@pytest.mark.parametrize("version", [True, 1.0, False, "1"])
def test_protocol_is_the_integer_1_only(version: Any) -> None:
    """JSON true and 1.0 equal 1 in Python; a Literal[1] took them, in strict mode too."""
    for msg in (envelope(), m.Receipt(device_id="pi-1", stream="00112233aabbccdd",
                                      up_to_seq=1, ts=1.0)):
        data = as_json(msg)
        data["protocol"] = version
        err = refusal(data, type(msg))
        assert err.field == "protocol"
        assert f"Input should be 1 (got {version!r}); this build speaks protocol 1" in str(err)


def test_the_hub_s_fast_decoder_refuses_a_protocol_of_true_too() -> None:
    from cloud_hub.envelope_fast import decode_envelope

    assert decode_envelope is not None  # the hub extra (msgspec) is installed for the tests
    data = as_json(envelope())
    data["protocol"] = True
    raw = json.dumps(data).encode()
    assert decode_envelope(raw) is None  # not sure: pydantic decides, and refuses
    with pytest.raises(m.MessageError, match=r"protocol: Input should be 1 \(got True\)"):
        wire.decode(raw, m.TelemetryEnvelope, fast=decode_envelope)


@pytest.mark.parametrize("device", BAD_DEVICE_IDS)
def test_bad_device_ids_refused_in_messages(device: str) -> None:
    """Every message refuses a device id that could not be its topic level."""
    for msg in (as_json(envelope()), {"device_id": "x", "stream": "0" * 16, "up_to_seq": 1,
                                        "ts": 1.0}):
        msg["device_id"] = device
        model = m.TelemetryEnvelope if "items" in msg else m.Receipt
        assert refusal(msg, model).field == "device_id"


@pytest.mark.parametrize(("seq", "ok"), [
    (1, True), (2**63 - 1, True), (0, False), (-1, False), (2**63, False), (True, False),
    ("5", False), (5.0, False),
])
def test_seq_is_a_positive_int64(seq: Any, ok: bool) -> None:
    """seq is an integer in 1..2**63-1; strings, floats and booleans are refused (strict)."""
    data = as_json(envelope())
    data["seq"] = seq
    if ok:
        assert wire.decode(json.dumps(data).encode(), m.TelemetryEnvelope).seq == seq
    else:
        assert refusal(data).field == "seq"


def test_items_count_bounds() -> None:
    """An envelope holds 1 to MAX_ITEMS items."""
    event = m.EventItem(ts=1.0, event="tick")
    assert len(wire.decode(wire.encode(envelope([event] * m.MAX_ITEMS)),
                        m.TelemetryEnvelope).items) == m.MAX_ITEMS
    data = as_json(envelope([event]))
    one = data["items"][0]
    for n in (0, m.MAX_ITEMS + 1):
        data["items"] = [one] * n
        assert refusal(data).field == "items"


def nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return dict(value)


def test_metrics_depth_and_size_bounds() -> None:
    """Metrics nest at most 6 containers deep and hold at most 20,000 values."""
    assert window(metrics=nested(6)).metrics == nested(6)
    for bad, message in [
        (nested(7), "nested 7 levels deep, at most 6 allowed"),
        ({"v": list(range(20_000))}, "holds more than 20000 values"),
        ({"s": "x" * 1025}, "string of 1025 characters"),
        ({"k" * 257: 1}, "key of 257 characters"),
        ({"big": 2**63}, "does not fit in 64 bits"),
    ]:
        data = as_json(envelope())
        data["items"][0]["metrics"] = bad
        err = refusal(data)
        assert err.field == "items.0.metrics" and message in str(err)
    nan = json.dumps(as_json(envelope())).replace('"requests": 3', '"requests": NaN')
    assert "not a finite number" in str(refusal(nan.encode()))


def test_python_values_that_are_not_json_refused() -> None:
    """window_item_from refuses metrics that would not survive JSON (numpy ints, NaN, tuples)."""
    for bad in ({"n": np.int64(3)}, {"x": float("nan")}, {"t": (1, 2)}, {"s": "\ud800"}):
        with pytest.raises(m.MessageError, match="metrics") as info:
            window(metrics=bad)
        assert info.value.field == "metrics"
    with pytest.raises(m.MessageError, match="not a JSON text"):
        window(metrics="{oops")
    with pytest.raises(m.MessageError, match="valid dictionary") as info:
        window(metrics="[1, 2]")
    assert info.value.field == "metrics"


def test_event_detail_is_flat_ish() -> None:
    """Event detail (and state health) nest at most 3 containers deep and hold 256 values."""
    assert m.EventItem(ts=1.0, event="swap", detail=nested(3)).detail == nested(3)
    for bad in (nested(4), {"v": list(range(256))}):
        with pytest.raises(ValueError, match=r"nested 4 levels|more than 256 values"):
            m.EventItem(ts=1.0, event="swap", detail=bad)
    with pytest.raises(ValueError, match="nested 4 levels"):
        m.StateMessage(device_id="pi", online=False, agent_version="1", ts=1.0, health=nested(4))


def test_window_consistency() -> None:
    """A window needs end > start and sketches written for the layout it names."""
    other = layout(2).fingerprint()
    with pytest.raises(m.MessageError, match=r"end 300\.0 must be after start 300\.0"):
        window(start=300.0)
    with pytest.raises(m.MessageError, match="inputs is not a sketch of layout"):
        window(layout=f"{other}/{layout().fingerprint()}")
    with pytest.raises(m.MessageError, match="layout: String should match pattern"):
        window(layout="abc")
    with pytest.raises(m.MessageError, match="rows: Input should be greater"):
        window(rows=-1)


@pytest.mark.parametrize(("text", "expected"), [
    ("5QE=", "at least 10 bytes"),
    ("5QFeARKTqK4YLA*=", "not valid base64"),
    ("5QFeARKTqK4YLAMBAR=", "not valid base64: Incorrect padding"),
    ("5QFeARKTqK4YLAMBAR==", "not canonical base64"),
    ("A" * (4 * (m.MAX_SKETCH_BYTES // 3 + 2)), "encodes more than 262144 bytes"),
])
def test_sketch_base64_is_strict(text: str, expected: str) -> None:
    """Sketch bytes must be canonical padded base64 of a bounded length."""
    data = as_json(envelope())
    data["items"][0]["inputs"] = text
    err = refusal(data)
    assert err.field == "items.0.inputs" and expected in str(err)


def test_sample_inputs_must_be_json() -> None:
    """A sample's inputs are a JSON text of at most 16 KiB."""
    ok = m.SampleItem(prediction_id="b-1f", ts=1.0, model_version="1.0.0", inputs='[1, null]')
    assert ok.inputs == "[1, null]"
    for bad in ("{", "[" * 5000, json.dumps(["x" * 17_000])):
        with pytest.raises(ValueError, match=r"JSON text|characters"):
            m.SampleItem(prediction_id="b-1f", ts=1.0, model_version="1.0.0", inputs=bad)


# --- commands ---------------------------------------------------------------------------------


@given(unsigned_commands(), st.randoms(use_true_random=False))
def test_canonical_bytes_ignore_key_order(cmd: m.UnsignedCommand, rnd: random.Random) -> None:
    """The same command content gives the same signing bytes, whatever the order of its keys."""
    data = cmd.model_dump(mode="json")
    items = list(data.items())
    rnd.shuffle(items)
    args = list(data["args"].items())
    rnd.shuffle(args)
    shuffled = m.UnsignedCommand.model_validate_json(json.dumps({**dict(items),
                                                                 "args": dict(args)}))
    assert shuffled.canonical_bytes() == cmd.canonical_bytes()
    assert cmd.canonical_bytes().startswith(m.COMMAND_SIGNING_CONTEXT)
    signed = cmd.signed(bytes(64))
    assert signed.canonical_bytes() == cmd.canonical_bytes()
    assert wire.decode(wire.encode(signed), m.Command).canonical_bytes() == cmd.canonical_bytes()


def test_canonical_bytes_cover_every_field() -> None:
    """Changing any field but the signature changes the signing bytes, and the format is pinned."""
    cmd = m.UnsignedCommand(device_id="pi-1", command_id="c1", key_id="0" * 16, seq=7,
                            issued_at=100.0, expires_at=160.0, kind="promote",
                            args={"b": 1, "a": 2})
    assert cmd.canonical_bytes() == (
        b'edgefleet/v1 command\n{"args":{"a":2,"b":1},"command_id":"c1","device_id":"pi-1",'
        b'"expires_at":160.0,"issued_at":100.0,"key_id":"0000000000000000","kind":"promote",'
        b'"protocol":1,"seq":7}')
    for change in ({"device_id": "pi-2"}, {"command_id": "c2"}, {"key_id": "1" * 16},
                   {"seq": 8}, {"issued_at": 101.0}, {"expires_at": 161.0}, {"kind": "commit"},
                   {"args": {"b": 1, "a": 3}}):
        assert cmd.model_copy(update=change).canonical_bytes() != cmd.canonical_bytes()
    assert cmd.signed(bytes(64)).canonical_bytes() == cmd.signed(b"\x01" * 64).canonical_bytes()


def test_command_rules() -> None:
    """Commands expire after they are issued, carry a 64-byte signature and know their expiry."""
    with pytest.raises(ValueError, match=r"expires_at 100\.0 must be after issued_at 100\.0"):
        m.UnsignedCommand(device_id="pi-1", command_id="c1", key_id="0" * 16, seq=1,
                          issued_at=100.0, expires_at=100.0, kind="commit")
    cmd = m.UnsignedCommand(device_id="pi-1", command_id="c1", key_id="0" * 16, seq=1,
                            issued_at=100.0, expires_at=160.0, kind="commit")
    assert not cmd.expired(159.9) and cmd.expired(160.0)
    data = as_json(cmd.signed(bytes(64)))
    data["signature"] = base64.b64encode(bytes(63)).decode()
    assert refusal(data, m.Command).field == "signature"
    del data["signature"]
    assert refusal(data, m.Command).field == "signature"
    data["kind"] = "reboot"
    assert refusal(data, m.UnsignedCommand).field == "kind"


# --- the measured size ------------------------------------------------------------------------


def test_typical_window_size_matches_the_docstring() -> None:
    """One 5-minute window at 10/s of 16 features x 16 bins encodes to ~1.75 KB, 256x under
    CSV."""
    from edge_agent.latency import LatencyHistogram

    rng = np.random.default_rng(0)
    n, f = 3000, 16
    scale, loc = rng.uniform(0.5, 50, f), rng.uniform(-100, 100, f)
    train = rng.normal(size=(20000, f)) * scale + loc
    bins = np.linspace(0, 1, 17)
    lay_in = SketchLayout(tuple(
        FeatureLayout(f"feature_{j:02d}", "numeric", edges=tuple(np.quantile(train[:, j], bins)))
        for j in range(f)))
    lay_out = SketchLayout((
        FeatureLayout("label", "categorical", categories=("low", "mid", "high")),
        FeatureLayout("score", "numeric", edges=tuple(bins))))
    x = (rng.normal(size=(n, f)) * scale + loc).astype(np.float32)
    s_in, s_out = Sketch.empty(lay_in), Sketch.empty(lay_out)
    for j in range(f):
        s_in.update_numeric(j, x[:, j].astype(np.float64))
    s_out.update_codes(0, rng.integers(0, 3, n))
    s_out.update_numeric(1, rng.beta(5, 2, n))
    lat = LatencyHistogram()
    lat.record_many(rng.lognormal(np.log(15), 0.4, n))
    conf = rng.integers(0, n // 9, (3, 3))
    metrics = {
        "requests": n, "rows": n, "rejected": 0, "errors": 0, "nonfinite_outputs": 0,
        "latency_us": lat.to_dict(), "latency_p50_us": lat.quantile(0.5),
        "latency_p95_us": lat.quantile(0.95), "latency_p99_us": lat.quantile(0.99),
        "raw": {"out_of_range_rows": 3, "empty_rows": 0},
        "feedback": {"count": 40, "concept_drift_detections": 0, "confusion": conf.tolist(),
                     "accuracy": float(np.trace(conf) / conf.sum())},
        "rss_bytes": 123_456_789,
        "shadow": {"compared": 0, "agreed": 0, "agreement": None, "mean_abs_diff": None,
                   "dropped": 0},
    }
    item = window(model_name="vibration-classifier", model_version="1.4.2",
                  start=1_767_225_600.0, end=1_767_225_900.0,
                  layout=f"{lay_in.fingerprint()}/{lay_out.fingerprint()}",
                  inputs=s_in.to_bytes(), outputs=s_out.to_bytes(), metrics=metrics, rows=n)
    env = envelope((item,), device_id="pi-0017", seq=1234, sent_at=1_767_225_901.25)
    sent_bytes = wire.encode(env)
    csv = io.StringIO()
    csv.write(",".join(lay_in.names) + "\n")
    for row in x:
        csv.write(",".join(f"{v:.7g}" for v in row) + "\n")
    raw = len(csv.getvalue().encode())
    assert (len(s_in.to_bytes()), len(s_out.to_bytes())) == (1214, 89)
    assert len(json.dumps(metrics, separators=(",", ":"))) == 701
    assert len(json.dumps(env.model_dump(mode="json"), separators=(",", ":"))) == 2851
    assert sent_bytes[:1] == b"\x78" and 1650 < len(sent_bytes) < 1850  # 1,751 with this zlib
    assert raw == 447_525 and 240 < raw / len(sent_bytes) < 272


def test_state_tags_are_bounded_labels() -> None:
    ok = m.StateMessage(device_id="pi-1", online=True, agent_version="0.1.0", swap_phase="idle",
                        tags={"site": "a", "cohort": "bright-1"}, ts=1.0)
    back = wire.decode(wire.encode(ok), m.StateMessage)
    assert back.tags == {"site": "a", "cohort": "bright-1"}
    for bad, field in (({"Site": "a"}, "tags.Site"), ({"site": "a b"}, "tags.site"),
                       ({f"k{i}": "v" for i in range(33)}, "tags")):
        raw = wire.encode(ok.model_copy(update={"tags": bad}))
        with pytest.raises(m.MessageError) as err:
            wire.decode(raw, m.StateMessage)
        assert err.value.field is not None and err.value.field.startswith(field)


def test_text_with_nul_is_refused_and_errors_escape_it() -> None:
    """PostgreSQL text cannot hold NUL: a payload carrying one (in a metrics key or value, an
    ack reason) is refused, and the error's path shows it escaped, never raw."""
    bad_key = as_json(envelope())
    bad_key["items"][0]["metrics"]["la\x00tency"] = 1
    bad_value = as_json(envelope())
    bad_value["items"][0]["metrics"]["note"] = "a\x00b"
    for doc in (bad_key, bad_value):
        with pytest.raises(m.MessageError) as err:
            wire.decode(json.dumps(doc).encode(), m.TelemetryEnvelope)
        assert "NUL" in str(err.value) and "\x00" not in str(err.value)
    ack = m.Ack(device_id="pi-1", command_id="c1", status="ok", reason="fine", ts=1.0)
    raw = json.dumps({**ack.model_dump(mode="json"), "reason": "x\x00y"}).encode()
    with pytest.raises(m.MessageError, match="NUL"):
        wire.decode(raw, m.Ack)


@pytest.mark.parametrize("stream", ["", "0" * 15, "0" * 17, "ABCDEF0123456789", "g" * 16, 12])
def test_stream_is_16_lowercase_hex_and_required(stream: Any) -> None:
    """An envelope and a receipt name their outbox stream: 16 lowercase hex, nothing else."""
    data = as_json(envelope())
    data["stream"] = stream
    assert refusal(data).field == "stream"
    del data["stream"]
    assert refusal(data).field == "stream"
    receipt = {"protocol": 1, "device_id": "pi-1", "stream": stream, "up_to_seq": 1, "ts": 1.0}
    assert refusal(receipt, m.Receipt).field == "stream"
    ok = m.Receipt(device_id="pi-1", stream=m.new_stream_id(), up_to_seq=3, ts=1.0)
    assert wire.decode(wire.encode(ok), m.Receipt) == ok


def test_envelope_key_reads_a_refused_envelope_loosely() -> None:
    """A telemetry payload that fails validation still names its (stream, seq, message_id)
    when those three are well formed; anything else (not JSON, oversized, bad fields) is None."""
    data = as_json(envelope(seq=7))
    data["items"][0]["surprise"] = 1
    raw = json.dumps(data).encode()
    with pytest.raises(m.MessageError):
        wire.decode(raw, m.TelemetryEnvelope)
    key = ("00112233aabbccdd", 7, "00000000-0000-4000-8000-000000000000")
    assert wire.envelope_key(raw) == key
    assert wire.envelope_key(zlib.compress(raw)) == key
    for bad in (b"", b"not json", b"[1]", b"{" + b" " * m.TelemetryEnvelope.MAX_WIRE_BYTES,
                json.dumps({**data, "seq": "7"}).encode(),
                json.dumps({**data, "seq": True}).encode(),
                json.dumps({**data, "stream": "XYZ"}).encode()):
        assert wire.envelope_key(bad) is None


@settings(max_examples=500)
@given(receipts)
def test_receipt_fast_path_writes_the_models_bytes(receipt: m.Receipt) -> None:
    """encode_receipt (the hub's per-batch path) writes exactly what encode(Receipt) writes."""
    assert wire.encode_receipt(receipt.device_id, receipt.stream, receipt.up_to_seq,
                            receipt.ts) == wire.encode(receipt)


@pytest.mark.parametrize(("args", "ok"), [
    (("pi-1", "00112233aabbccdd", 3, 5), True),  # an int ts: the model makes it a float
    (("pi-1", "00112233aabbccdd", True, 5.0), True),
    (("pi-1", "00112233aabbccdd", 3, -0.0), True),
    (("pi-1", "00112233aabbccdd", 3, float("inf")), False),
    (("pi-1", "00112233aabbccdd", -1, 5.0), False),
    (("pi/1", "00112233aabbccdd", 3, 5.0), False),
    (("pi-1", "00112233AABBCCDD", 3, 5.0), False),
])
def test_receipt_fast_path_leaves_the_rest_to_the_model(args: tuple[Any, ...],
                                                        ok: bool) -> None:
    """Values off the fast path get the model's answer: its bytes, or its refusal."""
    device_id, stream, up_to_seq, ts = args
    if ok:
        assert wire.encode_receipt(*args) == wire.encode(m.Receipt(
            device_id=device_id, stream=stream, up_to_seq=up_to_seq, ts=ts))
    else:
        with pytest.raises(ValueError):
            wire.encode_receipt(*args)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
base64_texts = st.text(_B64 + "-_ é", max_size=16) | st.binary(max_size=12).map(
    lambda b: base64.b64encode(b).decode()).flatmap(lambda s: st.integers(0, len(s)).flatmap(
        lambda i: st.sampled_from(_B64).map(lambda c: s[:i] + c + s[i + 1:])))


@settings(max_examples=1000)
@given(base64_texts)
def test_sketch_base64_fast_check_agrees_with_decode_and_reencode(text: str) -> None:
    """The JSON sketch decoder (strict decode, canonical check on the last group only) takes
    exactly the texts that base64.b64decode(validate=True) takes and re-encodes unchanged."""

    class JsonMode:  # a stand-in ValidationInfo: the decoder reads only its mode
        mode = "json"

    try:
        raw = base64.b64decode(text, validate=True)
        expected: bytes | None = raw if base64.b64encode(raw).decode() == text else None
    except ValueError:  # binascii.Error is one
        expected = None
    try:
        got: bytes | None = m._base64_decoder(1000)(text, cast(ValidationInfo, JsonMode()))
    except ValueError:
        got = None
    assert got == expected

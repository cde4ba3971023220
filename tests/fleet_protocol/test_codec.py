"""The sketch byte format: roundtrip, determinism, compactness and precise decode errors."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol import codec
from fleet_protocol.errors import CodecError
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout

INT63 = (1 << 63) - 1


def reference_leb128(value: int) -> bytes:
    """Unsigned LEB128, one byte at a time."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def make_layout(n_numeric: int = 2, inner_bins: int = 4) -> SketchLayout:
    numeric = [
        FeatureLayout(f"f{i}", "numeric", edges=tuple(np.linspace(-3, 3, inner_bins + 1)))
        for i in range(n_numeric)
    ]
    cat = FeatureLayout("mode", "categorical", categories=("idle", "run", "fault"))
    return SketchLayout((*numeric, cat))


def filled(layout: SketchLayout, rows: int, seed: int) -> Sketch:
    rng = np.random.default_rng(seed)
    s = Sketch.empty(layout)
    for j, f in enumerate(layout.features):
        if f.kind == "numeric":
            x = rng.normal(size=rows)
            x[rng.random(rows) < 0.01] = np.nan
            s.update_numeric(j, x)
        else:
            s.update_categorical(j, rng.choice(["idle", "run", "fault", "boot", ""], size=rows))
    return s


values_st = st.one_of(st.floats(-1e9, 1e9), st.sampled_from([math.nan, math.inf, -math.inf]))


@st.composite
def sketches(draw: st.DrawFn) -> Sketch:
    layout = make_layout(draw(st.integers(0, 3)), draw(st.integers(1, 6)))
    s = Sketch.empty(layout)
    for j, f in enumerate(layout.features):
        if f.kind == "numeric":
            s.update_numeric(j, np.array(draw(st.lists(values_st, max_size=30))))
        else:
            s.update_codes(j, np.array(draw(st.lists(st.integers(-1, 3), max_size=30))))
    # Counts far beyond one window must survive too (multi-byte varints).
    s.counts[draw(st.integers(0, layout.total_slots - 1))] += draw(st.integers(0, INT63 // 2))
    return s


@given(st.lists(st.integers(0, INT63), max_size=40))
def test_varints_match_reference_and_roundtrip(values: list[int]) -> None:
    """Vectorised varints equal byte-at-a-time LEB128 and decode back to the same integers."""
    arr = np.array(values, dtype=np.int64)
    data = codec.encode_uvarints(arr)
    assert data == b"".join(reference_leb128(v) for v in values)
    back, end = codec.decode_uvarints(data, len(values))
    assert back.tolist() == values
    assert end == len(data)


def test_varint_boundaries() -> None:
    """Values at 7-bit boundaries take the expected number of bytes, int64 max takes nine."""
    sizes = [len(codec.encode_uvarints(np.array([v]))) for v in (0, 127, 128, 16383, 16384, INT63)]
    assert sizes == [1, 1, 2, 2, 3, 9]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x00", "not canonical"),
        (b"\xff" * 9 + b"\x01", "at most 9"),
        (b"\x80\x80", "truncated"),
    ],
)
def test_bad_varints_raise(data: bytes, message: str) -> None:
    """Overlong, too long and unterminated varints raise CodecError saying which."""
    with pytest.raises(CodecError, match=message):
        codec.decode_uvarints(data, 1)


def test_negative_counts_cannot_be_encoded() -> None:
    """The encoder refuses negative integers instead of writing garbage."""
    with pytest.raises(CodecError, match="non-negative"):
        codec.encode_uvarints(np.array([3, -1]))


@settings(deadline=None)
@given(sketches())
def test_sketch_roundtrips_exactly_and_deterministically(sketch: Sketch) -> None:
    """from_bytes(to_bytes(s)) == s, and re-encoding the decoded sketch gives the same bytes."""
    data = sketch.to_bytes()
    back = Sketch.from_bytes(sketch.layout, data)
    assert back == sketch
    assert back.to_bytes() == data
    assert sketch.copy().to_bytes() == data


def test_header_layout_is_as_documented() -> None:
    """Bytes start with magic 0xE5, version 1 and the 8 fingerprint bytes."""
    s = filled(make_layout(), 100, seed=1)
    data = s.to_bytes()
    assert data[:2] == b"\xe5\x01"
    assert data[2:10] == bytes.fromhex(s.layout.fingerprint())


def test_realistic_sketch_is_well_under_4_kib() -> None:
    """16 numeric features x 16 inner bins with 10,000 rows each serialise to under 4096 bytes."""
    layout = SketchLayout(
        tuple(
            FeatureLayout(f"feature_{i:02d}", "numeric", edges=tuple(np.linspace(-2.5, 2.5, 17)))
            for i in range(16)
        )
    )
    s = Sketch.empty(layout)
    rng = np.random.default_rng(7)
    for j in range(16):
        s.update_numeric(j, rng.normal(size=10_000))
    size = len(s.to_bytes())
    assert size < 4096, size


def test_every_truncation_raises_codec_error() -> None:
    """Every proper prefix of a valid encoding raises CodecError saying it is truncated."""
    s = filled(make_layout(), 500, seed=2)
    data = s.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(CodecError, match="truncated"):
            Sketch.from_bytes(s.layout, data[:cut])


def test_trailing_bytes_raise() -> None:
    """Bytes after the end of the sketch raise CodecError."""
    s = filled(make_layout(), 50, seed=3)
    with pytest.raises(CodecError, match="trailing bytes: 1 bytes"):
        Sketch.from_bytes(s.layout, s.to_bytes() + b"\x00")


def test_wrong_version_magic_and_fingerprint_raise() -> None:
    """A different version, magic byte or layout fingerprint raises CodecError naming it."""
    s = filled(make_layout(), 50, seed=4)
    data = bytearray(s.to_bytes())
    with pytest.raises(CodecError, match="wrong version: sketch format version 2"):
        Sketch.from_bytes(s.layout, bytes(data[:1] + b"\x02" + data[2:]))
    with pytest.raises(CodecError, match="not an edgefleet sketch: first byte 0x00"):
        Sketch.from_bytes(s.layout, b"\x00" + bytes(data[1:]))
    other = make_layout(inner_bins=5)
    with pytest.raises(CodecError, match=f"wrong fingerprint.*{other.fingerprint()}"):
        Sketch.from_bytes(other, bytes(data))


def test_declared_lengths_must_match_the_layout() -> None:
    """A header whose slot or feature counts disagree with the layout raises CodecError."""
    layout = make_layout()
    s = filled(layout, 50, seed=5)
    data = bytearray(s.to_bytes())
    data[10] += 1  # total_slots varint (small, one byte)
    with pytest.raises(CodecError, match="wrong lengths"):
        Sketch.from_bytes(layout, bytes(data))


def test_inconsistent_moments_raise() -> None:
    """Decoded moments that cannot come from the counts (NaN mean, count > rows) raise."""
    layout = make_layout(n_numeric=1)
    s = filled(layout, 50, seed=6)
    nan_mean = s.copy()
    nan_mean.moments[0, 1] = math.nan
    with pytest.raises(CodecError, match=r"inconsistent.*'f0'"):
        Sketch.from_bytes(layout, nan_mean.to_bytes())
    too_many = s.copy()
    too_many.moments[0, 0] = s.feature_counts(0).sum() + 1
    with pytest.raises(CodecError, match=r"inconsistent.*moment count"):
        Sketch.from_bytes(layout, too_many.to_bytes())


@settings(deadline=None)
@given(st.binary(max_size=120))
def test_garbage_raises_only_codec_error(noise: bytes) -> None:
    """Arbitrary bytes, with or without a valid header, raise CodecError and nothing else."""
    layout = make_layout()
    header = bytes((codec.MAGIC, codec.VERSION)) + bytes.fromhex(layout.fingerprint())
    for data in (noise, header + noise):
        try:
            Sketch.from_bytes(layout, data)
        except CodecError:
            continue
        # Some noise is a valid encoding; then it must be canonical.
        assert Sketch.from_bytes(layout, data).to_bytes() == data


def test_dict_form_is_json_safe_base64() -> None:
    """to_dict gives the fingerprint and base64 bytes; from_dict inverts it through JSON."""
    s = filled(make_layout(), 200, seed=8)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["layout"] == s.layout.fingerprint()
    assert base64.b64decode(d["data"]) == s.to_bytes()
    assert Sketch.from_dict(s.layout, d) == s
    with pytest.raises(CodecError, match="base64"):
        Sketch.from_dict(s.layout, {"data": "not base64!"})
    with pytest.raises(CodecError, match="'data'"):
        Sketch.from_dict(s.layout, {})

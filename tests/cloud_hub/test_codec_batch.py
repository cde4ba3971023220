"""codec.decode_counts_batch (the rollups' decoder) and the hub's batched sketch check
(cloud_hub.sketch_check.bad_sketches) agree with decode_sketch one by one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub.sketch_check import _all_fit, bad_sketches, check_sketch
from fleet_protocol import codec
from fleet_protocol.errors import CodecError
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout
from tests.cloud_hub import fleet

LAYOUT = SketchLayout((
    FeatureLayout("x", "numeric", edges=tuple(float(e) for e in range(40))),
    FeatureLayout("c", "categorical", categories=("a", "b", "c")),
    FeatureLayout("y", "numeric", edges=(0.0, 1.0)),
))
DIMS = (LAYOUT.total_slots, LAYOUT.n_features, 2)


@settings(max_examples=50)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40),
       rows=st.integers(0, 100_000), missing=st.integers(0, 300))
def test_batch_decode_equals_one_by_one(seed: int, n: int, rows: int, missing: int) -> None:
    """Counts and missing of many sketches (small and multi-byte varints) decoded at once."""
    rng = np.random.default_rng(seed)
    sketches = [fleet.sketch(LAYOUT, rng, int(rng.integers(0, rows + 1)),
                             tilt=float(rng.normal()), missing=missing) for _ in range(n)]
    data = [s.to_bytes() for s in sketches]
    counts, miss = codec.decode_counts_batch(data, LAYOUT.fingerprint(), *DIMS)
    assert counts.shape == (n, LAYOUT.total_slots) and miss.shape == (n, LAYOUT.n_features)
    for i, raw in enumerate(data):
        one = Sketch.from_bytes(LAYOUT, raw)
        assert np.array_equal(counts[i], one.counts) and np.array_equal(miss[i], one.missing)


def test_batch_decode_names_the_sketch_that_does_not_fit() -> None:
    rng = np.random.default_rng(0)
    good = [fleet.sketch(LAYOUT, rng, 50).to_bytes() for _ in range(3)]
    other = fleet.sketch(fleet.TOY_IN, rng, 50).to_bytes()
    with pytest.raises(CodecError, match="sketch 1 of the batch is not a sketch of layout"):
        codec.decode_counts_batch([good[0], other, good[2]], LAYOUT.fingerprint(), *DIMS)
    # one varint moved from one sketch's counts to the next one's: totals match, parts do not
    head = good[0][:13]  # magic, version, fingerprint, three one-byte lengths
    moments = good[0][-80:]

    def body(n_counts: int) -> bytes:
        return head + codec.encode_uvarints(np.full(n_counts + 3, 300)) + moments

    with pytest.raises(CodecError, match="sketch 0 of the batch does not hold exactly 51"):
        codec.decode_counts_batch([body(47), body(49)], LAYOUT.fingerprint(), *DIMS)


def _mutated(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with one small damage: a byte changed, cut, added, or a varint spelt overlong
    (never shorter than a header: the message model refuses those before any sketch check)."""
    if len(data) <= codec.HEADER_BYTES + 1:
        return data
    pos = int(rng.integers(codec.HEADER_BYTES, len(data)))
    how = int(rng.integers(0, 5))
    if how == 0:  # anywhere, the header too
        pos = int(rng.integers(0, len(data)))
        return data[:pos] + bytes([int(rng.integers(0, 256))]) + data[pos + 1:]
    if how == 1:
        return data[:pos]
    if how == 2:
        return data[:pos] + bytes([int(rng.integers(0, 256))]) + data[pos:]
    if how == 3:  # a count's terminal byte made a continuation byte, then a zero terminal
        return data[:pos] + bytes([data[pos] | 0x80, 0]) + data[pos + 1:]
    return data[:pos] + data[pos + 1:]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), damaged=st.integers(0, 4),
       rows=st.sampled_from([0, 5, 300, 100_000]))
def test_bad_sketches_agree_with_check_sketch_one_by_one(seed: int, n: int, damaged: int,
                                                         rows: int) -> None:
    """The batched sketch check refuses exactly the sketches the single decode refuses, with
    its reason, whatever the damage (cut, padded, changed, overlong varints, other lengths)."""
    rng = np.random.default_rng(seed)
    layouts = [LAYOUT, fleet.TOY_IN, fleet.TOY_OUT]
    batch: list[tuple[bytes, str]] = []
    for _ in range(n):
        lay = layouts[int(rng.integers(0, len(layouts)))]
        batch.append((fleet.sketch(lay, rng, int(rng.integers(0, rows + 1)),
                                   missing=int(rng.integers(0, 3))).to_bytes(),
                      lay.fingerprint()))
    for _ in range(damaged):
        i = int(rng.integers(0, n))
        batch[i] = (_mutated(batch[i][0], rng), batch[i][1])
    expected: dict[int, str] = {}
    for i, (data, fingerprint) in enumerate(batch):
        try:
            check_sketch(data, fingerprint)
        except CodecError as err:
            expected[i] = str(err)
    assert bad_sketches(batch) == expected


def all_fit_reference(datas: list[bytes], head: bytes, per: int, tail: int) -> bool:
    """sketch_check._all_fit in plain Python, one varint at a time."""
    for data in datas:
        if len(data) < len(head) + per + tail or not data.startswith(head):
            return False
        body = data[len(head):len(data) - tail]
        pos = 0
        for _ in range(per):
            length = 0
            while True:
                if pos >= len(body):
                    return False
                byte = body[pos]
                pos += 1
                length += 1
                if byte < 0x80:
                    break
            if length > 9 or (length > 1 and byte == 0):
                return False
        if pos != len(body):
            return False
    return True


#: one varint: how many continuation bytes (up to 11: 12 bytes long), then its last byte
_VARINT = st.tuples(st.integers(0, 11), st.sampled_from([0x00, 0x01, 0x7F]))


@settings(max_examples=400, deadline=None)
@given(n=st.integers(0, 6),
       varints=st.lists(st.lists(_VARINT, min_size=7, max_size=7), min_size=1, max_size=6),
       ragged=st.lists(st.sampled_from([0, 0, 0, -1, 1]), min_size=6, max_size=6),
       per_delta=st.sampled_from([0, 0, 0, -1, 1]), tail=st.integers(0, 3),
       bad_head=st.booleans())
def test_all_fit_agrees_with_its_plain_python_reference(
        n: int, varints: list[list[tuple[int, int]]], ragged: list[int], per_delta: int,
        tail: int, bad_head: bool) -> None:
    """The numpy check of a batch's varints (how many per sketch, each sketch's last byte,
    varints of up to 12 bytes, overlong zeros) says what the one-varint-at-a-time reference
    says, for the batch and for each sketch alone."""
    head = b"\xe5\x01" + bytes(range(8)) + b"\x02\x01\x00"
    datas = []
    for i, sketch in enumerate(varints):
        body = b"".join(bytes([0x80 | (37 * k % 128) for k in range(more)]) + bytes([last])
                        for more, last in sketch[:max(0, n + ragged[i])])
        datas.append(head + body + bytes(range(tail)))
    if bad_head:
        datas[-1] = b"\x00" + datas[-1][1:]
    per = max(0, n + per_delta)
    assert _all_fit(datas, head, per, tail) == all_fit_reference(datas, head, per, tail)
    for data in datas:
        assert _all_fit([data], head, per, tail) == all_fit_reference([data], head, per, tail)


def test_a_sketch_of_no_slots_and_no_features_is_checked_not_raised() -> None:
    """A header declaring zero lengths (and the fingerprint it names) is what check_sketch
    accepts: the batched check agrees instead of failing on it (it raised ValueError, and the
    worker took the whole batch for a database error)."""
    fingerprint = "0123456789abcdef"
    empty = (bytes((codec.MAGIC, codec.VERSION)) + bytes.fromhex(fingerprint)
             + codec.encode_uvarints(np.zeros(3, dtype=np.uint64)))
    check_sketch(empty, fingerprint)
    assert bad_sketches([(empty, fingerprint), (empty, fingerprint)]) == {}
    assert set(bad_sketches([(empty + b"\x00", fingerprint)])) == {0}

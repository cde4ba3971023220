"""The hub's check of the sketches it stores: each one decodes by its own header, checked a
batch at a time.

The hub may not know a window's bundle, so a sketch is checked against what its header
declares (``fleet_protocol.codec``: magic, version, layout fingerprint, lengths, canonical
varints, no trailing bytes). A decode per sketch is a dozen numpy calls; here all the
sketches of one layout in a batch are checked together with a few numpy passes
(:func:`bad_sketches`), and only those that do not fit are decoded one by one to say why.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fleet_protocol import codec
from fleet_protocol.errors import CodecError

__all__ = ["bad_sketches", "check_sketch"]


def _header(data: bytes) -> tuple[int, int, int] | None:
    """The three lengths a sketch header declares (None if they do not parse: the single
    decode then says why). Plain Python: a few bytes, called once per sketch."""
    pos, out = codec.HEADER_BYTES, []
    for _ in range(3):
        value = shift = 0
        for _byte in range(9):
            if pos >= len(data):
                return None
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        else:
            return None
        out.append(value)
    return out[0], out[1], out[2]


def check_sketch(data: bytes, fingerprint: str) -> None:
    """CodecError unless ``data`` decodes as a sketch of layout ``fingerprint`` by its own
    header (the hub may not know the bundle; the header says the lengths)."""
    dims, _ = codec.decode_uvarints(data, 3, codec.HEADER_BYTES, "header")
    codec.decode_sketch(data, fingerprint, *(int(d) for d in dims))


def _form(data: bytes, fingerprint: str) -> tuple[bytes, int, int] | None:
    """What every sketch of layout ``fingerprint`` with the lengths ``data``'s header declares
    looks like: (its exact header bytes, number of count varints, bytes of moments); None when
    ``data``'s header does not parse (the single check says why)."""
    dims = _header(data)
    if dims is None:
        return None
    slots, features, numeric = dims
    try:
        head = (bytes((codec.MAGIC, codec.VERSION)) + bytes.fromhex(fingerprint)
                + codec.encode_uvarints(np.array(dims, dtype=np.uint64)))
    except (ValueError, CodecError, OverflowError):
        return None
    return head, slots + features, numeric * codec.MOMENT_FIELDS * 8


def _all_fit(datas: Sequence[bytes], head: bytes, per: int, tail: int) -> bool:
    """True when every sketch of ``datas`` is ``head``, then exactly ``per`` canonical varints
    of at most 9 bytes, then ``tail`` bytes of moments: what ``codec.decode_counts_batch``
    checks (and so :func:`check_sketch`, moments being any 8-byte floats), without decoding a
    value. A few numpy passes over the bytes of the whole batch, on byte-sized flags, with no
    array of varint positions: measured offline on batches of 500 of the benchmark's windows
    (sketches fresh from decoding, not in the CPU's caches), :func:`bad_sketches` took 4.7 µs
    per message with one (int64 positions, their differences) and 1.7 µs like this. The
    plain-Python reference is in tests/cloud_hub/test_codec_batch.py; a test holds the two
    equal."""
    start = len(head)
    parts = []
    for data in datas:
        if len(data) < start + per + tail or not data.startswith(head):
            return False
        parts.append(data[start:len(data) - tail])
    if per == 0:  # a sketch of no slots and no features: nothing between header and moments
        return not any(parts)
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
    more = buf >= 0x80  # a continuation byte: the varint goes on
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    firsts = np.cumsum(lengths) - lengths
    # each sketch holds exactly ``per`` last bytes of a varint, its own last byte one of them
    if more[firsts + lengths - 1].any() \
            or not (np.add.reduceat(~more, firsts, dtype=np.int64) == per).all():
        return False
    # no varint of more than 9 bytes: no 9 continuation bytes in a row (runs of 2, 4, 8, 9)
    run = more[:-1] & more[1:]
    run = run[:-2] & run[2:]
    run = run[:-4] & run[4:]
    if (run[:-1] & run[1:]).any():
        return False
    # not overlong: no multi-byte varint whose last byte is 0 (adds nothing)
    return not ((buf[1:] == 0) & more[:-1]).any()


def bad_sketches(sketches: Sequence[tuple[bytes, str]]) -> dict[int, str]:
    """The sketches among (bytes, layout fingerprint) that :func:`check_sketch` refuses, by
    index, with why. The sketches of one layout are checked together by :func:`_all_fit` (a
    few numpy passes for the whole batch instead of a decode per sketch); when a group does not
    all fit, each of its sketches is checked alone, and those that still do not fit go through
    :func:`check_sketch`, which says why (or passes one whose header declares other
    lengths)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (_, fingerprint) in enumerate(sketches):
        groups[fingerprint].append(i)
    bad: dict[int, str] = {}
    for fingerprint, members in groups.items():
        datas = [sketches[i][0] for i in members]
        form = _form(datas[0], fingerprint)
        if form is not None and _all_fit(datas, *form):
            continue
        for i, data in zip(members, datas, strict=True):
            if form is not None and _all_fit([data], *form):
                continue
            try:
                check_sketch(data, fingerprint)
            except CodecError as err:
                bad[i] = str(err)
    return bad

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
    value. A few numpy passes over the whole batch."""
    start = len(head)
    parts = []
    for data in datas:
        if len(data) < start + per + tail or not data.startswith(head):
            return False
        parts.append(data[start:len(data) - tail])
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
    ends = np.flatnonzero(buf < 0x80)  # the last byte of each varint
    if ends.size != per * len(parts):
        return False
    part_ends = np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))) - 1
    if not np.array_equal(ends[per - 1::per], part_ends):
        return False  # some sketch holds more or fewer than ``per`` varints
    lengths = np.diff(ends, prepend=-1)
    # longer than 9 bytes, or overlong: a multi-byte varint whose last byte adds nothing
    return bool(lengths.max() <= 9 and not ((buf[ends] == 0) & (lengths > 1)).any())


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

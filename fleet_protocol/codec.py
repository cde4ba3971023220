"""Byte encoding of drift sketches: a small, versioned, deterministic binary format.

A sketch crosses the device/hub boundary as bytes, so the format is pinned here and versioned.
Version 1 (all integers are unsigned LEB128 varints unless said otherwise)::

    offset  size  field
    0       1     magic, 0xE5
    1       1     format version, 1
    2       8     layout fingerprint (the 16 hex characters of ``SketchLayout.fingerprint()``)
    10      var   total_slots, then n_features, then n_numeric
    ...     var   counts: total_slots varints, in layout order
    ...     var   missing: n_features varints
    ...     40*k  moments of the k = n_numeric numeric features, in layout order, each as five
                  little-endian float64: count, mean, M2, min, max

Categorical features have no moments on the wire (theirs are constant). Encoding is canonical:
varints use the fewest bytes, so the same sketch always gives the same bytes, and decoding
rejects any other spelling (overlong varints, trailing bytes), so bytes and sketches correspond
one to one. Counts must fit in int64 (at most 9 varint bytes).

This module knows bytes and arrays only; ``fleet_protocol.sketch`` maps them to a ``Sketch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fleet_protocol.errors import CodecError

MAGIC = 0xE5
VERSION = 1
FINGERPRINT_BYTES = 8
HEADER_BYTES = 2 + FINGERPRINT_BYTES
MOMENT_FIELDS = 5
_MAX_VARINT_BYTES = 9  # 9 x 7 = 63 bits: every non-negative int64
_LITTLE_F8 = np.dtype("<f8")


def encode_uvarints(values: npt.ArrayLike) -> bytes:
    """Encode non-negative integers (< 2**63) as concatenated unsigned LEB128 varints."""
    v = np.asarray(values)
    if v.ndim != 1:
        raise CodecError(f"varints encode a 1-D array, got shape {v.shape}")
    if v.size == 0:
        return b""
    if not np.issubdtype(v.dtype, np.integer):
        raise CodecError(f"varints encode integers, got dtype {v.dtype}")
    if v.min() < 0:
        raise CodecError(f"varints encode non-negative integers, got {int(v.min())}")
    u = v.astype(np.uint64)
    nbytes = np.ones(u.size, dtype=np.int64)
    for k in range(1, _MAX_VARINT_BYTES):
        nbytes += u >= np.uint64(1 << (7 * k))
    if int(u.max()) >= 1 << 63:
        raise CodecError(f"varints encode values below 2**63, got {int(u.max())}")
    group = np.repeat(np.arange(u.size), nbytes)
    starts = np.cumsum(nbytes) - nbytes
    pos = np.arange(group.size) - starts[group]
    payload = (u[group] >> (7 * pos).astype(np.uint64)) & np.uint64(0x7F)
    more = (pos < nbytes[group] - 1).astype(np.uint64) << np.uint64(7)
    return (payload | more).astype(np.uint8).tobytes()


def decode_uvarints(
    data: bytes, count: int, offset: int = 0, what: str = "varints"
) -> tuple[npt.NDArray[np.int64], int]:
    """Decode ``count`` canonical varints from ``data[offset:]``; return them and the new offset.

    Raises CodecError naming ``what`` when the data ends early, a varint is overlong
    (non-canonical) or longer than 9 bytes.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), offset
    buf = np.frombuffer(data, dtype=np.uint8, offset=offset)
    ends = np.flatnonzero(buf < 0x80)[:count]
    if ends.size < count:
        raise CodecError(
            f"truncated: {what} need {count} varints, only {ends.size} complete ones in the "
            f"{buf.size} bytes after offset {offset}"
        )
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        bad = int(np.argmax(lengths > _MAX_VARINT_BYTES))
        raise CodecError(
            f"{what}: varint {bad} is {int(lengths[bad])} bytes long, at most "
            f"{_MAX_VARINT_BYTES} expected (value must fit in int64)"
        )
    overlong = (lengths > 1) & (buf[ends] == 0)
    if overlong.any():
        bad = int(np.argmax(overlong))
        raise CodecError(f"{what}: varint {bad} is not canonical (overlong encoding)")
    end = int(ends[-1]) + 1
    seg = buf[:end].astype(np.uint64) & np.uint64(0x7F)
    pos = np.arange(end) - np.repeat(starts, lengths)
    values = np.add.reduceat(seg << (7 * pos).astype(np.uint64), starts)
    return values.astype(np.int64), offset + end


@dataclass(frozen=True)
class SketchPayload:
    """The arrays of one decoded sketch (moments only for numeric features)."""

    counts: npt.NDArray[np.int64]
    missing: npt.NDArray[np.int64]
    numeric_moments: npt.NDArray[np.float64]  # shape (n_numeric, 5)


def encode_sketch(
    fingerprint: str,
    counts: npt.NDArray[np.int64],
    missing: npt.NDArray[np.int64],
    numeric_moments: npt.NDArray[np.float64],
) -> bytes:
    """Encode one sketch's arrays in format version 1 (see the module docstring)."""
    fp = _fingerprint_bytes(fingerprint)
    moments = np.asarray(numeric_moments, dtype=np.float64)
    if moments.ndim != 2 or moments.shape[1] != MOMENT_FIELDS:
        raise CodecError(f"moments must have shape (n_numeric, 5), got {moments.shape}")
    header = encode_uvarints(np.array([counts.size, missing.size, moments.shape[0]]))
    return b"".join(
        (
            bytes((MAGIC, VERSION)),
            fp,
            header,
            encode_uvarints(counts),
            encode_uvarints(missing),
            moments.astype(_LITTLE_F8).tobytes(),
        )
    )


def decode_sketch(
    data: bytes, fingerprint: str, total_slots: int, n_features: int, n_numeric: int
) -> SketchPayload:
    """Decode bytes written by :func:`encode_sketch` for the layout described by the arguments.

    Checks, in order: length of the header, magic, version, fingerprint, declared lengths,
    the varints, the moments block and trailing bytes; raises CodecError naming what is wrong.
    """
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise CodecError(f"truncated: {len(data)} bytes, a sketch header needs {HEADER_BYTES}")
    if data[0] != MAGIC:
        raise CodecError(
            f"not an edgefleet sketch: first byte 0x{data[0]:02X}, expected 0x{MAGIC:02X}"
        )
    if data[1] != VERSION:
        raise CodecError(
            f"wrong version: sketch format version {data[1]}, this build reads version "
            f"{VERSION}; upgrade the reader or re-encode the sketch"
        )
    expected_fp = _fingerprint_bytes(fingerprint)
    got_fp = data[2:HEADER_BYTES]
    if got_fp != expected_fp:
        raise CodecError(
            f"wrong fingerprint: sketch was written for layout {got_fp.hex()}, the layout "
            f"given is {fingerprint}; decode it with the layout it was written for"
        )
    (n_slots_in, n_feat_in, n_num_in), off = decode_uvarints(data, 3, HEADER_BYTES, "header")
    declared = (int(n_slots_in), int(n_feat_in), int(n_num_in))
    wanted = (total_slots, n_features, n_numeric)
    if declared != wanted:
        raise CodecError(
            f"wrong lengths: sketch declares (slots, features, numeric) = {declared}, the "
            f"layout has {wanted}"
        )
    counts, off = decode_uvarints(data, total_slots, off, "counts")
    missing, off = decode_uvarints(data, n_features, off, "missing")
    need = n_numeric * MOMENT_FIELDS * _LITTLE_F8.itemsize
    if len(data) - off < need:
        raise CodecError(
            f"truncated: moments need {need} bytes, {len(data) - off} left at offset {off}"
        )
    moments = np.frombuffer(data, dtype=_LITTLE_F8, count=n_numeric * MOMENT_FIELDS, offset=off)
    off += need
    if off != len(data):
        raise CodecError(
            f"trailing bytes: {len(data) - off} bytes after the end of the sketch at offset {off}"
        )
    return SketchPayload(
        counts=counts,
        missing=missing,
        numeric_moments=moments.astype(np.float64).reshape(n_numeric, MOMENT_FIELDS),
    )


def _fingerprint_bytes(fingerprint: str) -> bytes:
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError as err:
        raise CodecError(f"fingerprint {fingerprint!r} is not hex") from err
    if len(raw) != FINGERPRINT_BYTES:
        raise CodecError(
            f"fingerprint {fingerprint!r} has {len(raw)} bytes, expected {FINGERPRINT_BYTES}"
        )
    return raw


def decode_counts_batch(
    datas: Sequence[bytes | bytearray | memoryview], fingerprint: str, total_slots: int,
    n_features: int, n_numeric: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Counts and missing of many sketches of one layout at once: ``(n, total_slots)`` and
    ``(n, n_features)`` arrays, moments skipped.

    For sums over thousands of stored windows (the hub's rollups), where one
    :func:`decode_sketch` per sketch would cost tens of microseconds. It checks what it reads
    as :func:`decode_sketch` does (magic, version, fingerprint, declared lengths, canonical
    varints, exactly ``total_slots + n_features`` varints before a moments block of the right
    size in every sketch), but not the moments themselves.
    """
    n = len(datas)
    per = total_slots + n_features
    if n == 0:
        return (np.zeros((0, total_slots), dtype=np.int64),
                np.zeros((0, n_features), dtype=np.int64))
    head = (bytes((MAGIC, VERSION)) + _fingerprint_bytes(fingerprint)
            + encode_uvarints(np.array([total_slots, n_features, n_numeric])))
    tail = n_numeric * MOMENT_FIELDS * _LITTLE_F8.itemsize
    parts: list[bytes] = []
    for i, data in enumerate(datas):
        raw = bytes(data)
        if not raw.startswith(head) or len(raw) < len(head) + per + tail:
            raise CodecError(
                f"sketch {i} of the batch is not a sketch of layout {fingerprint} with "
                f"(slots, features, numeric) = {(total_slots, n_features, n_numeric)} "
                f"(header {raw[:len(head)].hex()}, {len(raw)} bytes)"
            )
        parts.append(raw[len(head):len(raw) - tail])
    joined = b"".join(parts)
    values, end = decode_uvarints(joined, n * per, 0, "batch counts")
    ends = np.flatnonzero(np.frombuffer(joined, dtype=np.uint8) < 0x80)
    part_ends = np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=n))
    if end != len(joined) or not np.array_equal(ends[per - 1::per] + 1, part_ends):
        bad = int(np.argmax(ends[per - 1::per] + 1 != part_ends)) if ends.size == n * per else 0
        raise CodecError(
            f"sketch {bad} of the batch does not hold exactly {per} count varints before its "
            f"{tail}-byte moments block"
        )
    table = values.reshape(n, per)
    return table[:, :total_slots].copy(), table[:, total_slots:].copy()

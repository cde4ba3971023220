"""The hub's inflate (fleet_protocol.wire._inflate with ISA-L, which the hub extra installs)
ends every payload as zlib's own inflate does: the same JSON, or the same error."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol import messages as msgs
from fleet_protocol import wire


def _outcome(inflate: object, data: bytes, limit: int) -> tuple[str, object]:
    try:
        return "ok", inflate(data, limit, "TelemetryEnvelope")  # type: ignore[operator]
    except msgs.MessageError as err:
        return "error", (str(err), err.field)


def _same(data: bytes, limit: int) -> None:
    assert _outcome(wire._inflate, data, limit) == _outcome(wire._zlib_inflate, data, limit)


def test_isal_is_what_inflates() -> None:
    assert wire._isal_zlib is not None


@settings(max_examples=300)
@given(body=st.binary(max_size=3000) | st.text(max_size=3000).map(str.encode),
       level=st.integers(0, 9), limit=st.integers(0, 4000),
       damage=st.sampled_from(["none", "cut", "flip", "trail", "checksum", "head"]),
       where=st.integers(0, 10_000), byte=st.integers(1, 255))
def test_isal_ends_every_payload_as_zlib(body: bytes, level: int, limit: int, damage: str,
                                         where: int, byte: int) -> None:
    """Whole, cut, damaged, over the limit, with bytes after the stream or a bad checksum."""
    data = bytearray(zlib.compress(body, level))
    i = where % len(data)
    if damage == "cut":
        del data[i:]
    elif damage == "flip":
        data[i] ^= byte
    elif damage == "trail":
        data += bytes([byte]) * (1 + where % 5)
    elif damage == "checksum":
        data[-1] ^= byte
    elif damage == "head":
        data[1] ^= byte
    _same(bytes(data), limit)


@pytest.mark.parametrize("data", [b"", b"\x78", b"\x78\x9c", b"\x78garbage",
                                  zlib.compress(b"{" + b" " * 100_000)])
def test_odd_payloads(data: bytes) -> None:
    _same(data, 1000)

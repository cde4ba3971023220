"""Device tags and tag selectors: ``site=a,cohort=bright`` picks the devices whose tags match.

A device reports its own tags (its config); operators set theirs on the hub, and those
override the device's. Keys are 1-64 lowercase letters, digits, ``_``, ``.``, ``-`` starting
with a letter; values 1-128 letters, digits, ``_``, ``.``, ``:``, ``-``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cloud_hub.errors import SelectorError

__all__ = ["Selector", "parse_selector", "parse_tags", "tag_pair"]

_TAG_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_TAG_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True)
class Selector:
    """All of ``terms`` must match a device's tags (operator tags override device tags)."""

    terms: tuple[tuple[str, str], ...]

    def matches(self, tags: Mapping[str, str]) -> bool:
        return all(tags.get(k) == v for k, v in self.terms)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.terms)


def tag_pair(part: str, what: str, *, allow_empty_value: bool = False) -> tuple[str, str]:
    """``key=value`` -> (key, value); SelectorError naming ``what`` and the bad key or value."""
    key, sep, value = part.partition("=")
    key, value = key.strip(), value.strip()
    if not sep:
        raise SelectorError(f"{what} {part!r} is not key=value (e.g. site=a,cohort=bright)")
    if not _TAG_KEY.fullmatch(key):
        raise SelectorError(f"{what} {part!r}: key {key!r} is not a tag key (1-64 lowercase "
                            "letters, digits, '_', '.', '-', starting with a letter)")
    if not (allow_empty_value and value == "") and not _TAG_VALUE.fullmatch(value):
        raise SelectorError(f"{what} {part!r}: value {value!r} is not a tag value (1-128 "
                            "letters, digits, '_', '.', ':', '-')")
    return key, value


def parse_selector(text: str | Selector | None) -> Selector:
    """``site=a,cohort=bright`` -> Selector; None or "" selects every device.

    SelectorError names the bad part; a key given twice with different values is refused
    (nothing could match it).
    """
    if isinstance(text, Selector):
        return text
    if text is None or not text.strip():
        return Selector(())
    terms: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            raise SelectorError(f"selector {text!r} has an empty part (a stray ',')")
        key, value = tag_pair(part, "selector part")
        if terms.get(key, value) != value:
            raise SelectorError(f"selector {text!r} asks {key}={terms[key]} and {key}={value}; "
                                "nothing can match both")
        terms[key] = value
    return Selector(tuple(sorted(terms.items())))


def parse_tags(items: Sequence[str]) -> dict[str, str | None]:
    """``["site=a", "cohort="]`` -> ``{"site": "a", "cohort": None}`` (empty value: remove)."""
    out: dict[str, str | None] = {}
    for item in items:
        key, value = tag_pair(item, "tag", allow_empty_value=True)
        out[key] = value or None
    return out

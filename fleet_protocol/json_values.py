"""Free-form JSON values inside protocol messages, checked against (depth, values) limits.

Window metrics, event detail and command args are plain JSON objects, not schemas: one
iterative walk checks them (no recursive schema: FIELD-NOTES, "Security facts", validation
time of recursive schemas can explode). Keys and strings are text of bounded length without
NUL (PostgreSQL text columns cannot hold one) that encodes as UTF-8; integers fit in 64 bits;
floats are finite. :func:`json_ok` is the fast yes; :func:`explain_json` says what is wrong.
"""

from __future__ import annotations

import math
from typing import Any

MAX_TEXT_CHARS = 1024
MAX_KEY_CHARS = 256
INT64_MAX = 2**63 - 1

__all__ = ["INT64_MAX", "MAX_KEY_CHARS", "MAX_TEXT_CHARS", "check_json", "check_text",
           "explain_json", "json_ok", "printable", "text_ok"]


def text_ok(s: str, limit: int) -> bool:
    if len(s) > limit or "\x00" in s:
        return False
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: small key sets of free-form dicts found valid: a fleet's agents write the same few over and
#: over, and a set lookup costs less than checking each key (cleared when full; bounded in
#: memory by _GOOD_KEYS_MAX x _GOOD_KEYS_LEN keys of at most MAX_KEY_CHARS)
_good_keys: set[tuple[str, ...]] = set()
_GOOD_KEYS_MAX = 1024
_GOOD_KEYS_LEN = 16
_INT64_MIN = -INT64_MAX - 1


def _keys_ok(keys: tuple[Any, ...]) -> bool:
    for k in keys:
        if type(k) is not str or not text_ok(k, MAX_KEY_CHARS):
            return False
    if len(keys) <= _GOOD_KEYS_LEN:
        if len(_good_keys) >= _GOOD_KEYS_MAX:
            _good_keys.clear()
        _good_keys.add(keys)
    return True


def json_ok(value: Any, max_depth: int, max_values: int) -> bool:
    """The fast path of :func:`check_json`: True when ``value`` passes, without building the
    paths an error message needs (the hub validates every window's metrics: ~80 values).
    False means "not sure": the caller walks again, value by value, to say what is wrong."""
    if type(value) is not dict:
        return False
    count = 1
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    isfinite = math.isfinite
    while stack:
        container, depth = pop()
        if depth > max_depth:
            return False
        count += len(container)
        if count > max_values:
            return False
        if type(container) is dict:
            keys = tuple(container)
            if keys not in _good_keys and not _keys_ok(keys):
                return False
            items = container.values()
        else:
            items = container
        for v in items:
            t = type(v)
            if t is int:
                if not _INT64_MIN <= v <= INT64_MAX:
                    return False
            elif t is float:
                if not isfinite(v):
                    return False
            elif t is str:
                if not text_ok(v, MAX_TEXT_CHARS):
                    return False
            elif t is dict or t is list:
                push((v, depth + 1))
            elif v is not None and t is not bool:
                return False
    return True


def check_json(value: dict[str, Any], limits: tuple[int, int]) -> dict[str, Any]:
    """Check that ``value`` is a JSON object within (depth, values) ``limits``, iteratively."""
    if not json_ok(value, *limits):
        explain_json(value, limits)  # something is wrong: say what and where
    return value


def explain_json(value: Any, limits: tuple[int, int]) -> None:
    """The walk behind :func:`check_json`'s refusals: value by value, building paths;
    ValueError for the first thing wrong (none: :func:`json_ok` was only unsure)."""
    max_depth, max_values = limits
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    count = 1
    while stack:
        v, path, depth = stack.pop()
        at = f"at {path.lstrip('.')}: " if path else ""
        if isinstance(v, dict | list):
            if depth > max_depth:
                raise ValueError(f"{at}nested {depth} levels deep, at most {max_depth} allowed")
            count += len(v)
            if count > max_values:
                raise ValueError(f"holds more than {max_values} values, at most {max_values} "
                                 "allowed")
            for k, item in v.items() if isinstance(v, dict) else enumerate(v):
                if isinstance(v, dict):
                    if not isinstance(k, str):
                        raise ValueError(f"{at}key {k!r} is not a string")
                    check_text(k, MAX_KEY_CHARS, f"{at}key")
                stack.append((item, f"{path}.{printable(k)}", depth + 1))
        elif isinstance(v, str):
            check_text(v, MAX_TEXT_CHARS, f"{at}string")
        elif v is None or isinstance(v, bool):
            pass
        elif isinstance(v, int):
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise ValueError(f"{at}integer {v} does not fit in 64 bits")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{at}{v} is not a finite number (use null)")
        else:
            raise ValueError(f"{at}{type(v).__name__} {v!r:.40} is not a JSON value")


def printable(key: object) -> str:
    """A key as it may appear in an error path: control characters escaped (a NUL in a reason
    stored at the hub would fail on PostgreSQL text columns)."""
    text = str(key)
    return text if text.isprintable() else repr(text)[1:-1]


def check_text(s: str, limit: int, what: str = "string") -> str:
    if len(s) > limit:
        raise ValueError(f"{what} of {len(s)} characters, at most {limit} allowed")
    if "\x00" in s:
        raise ValueError(f"{what} contains a NUL character, which text may not hold")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid UTF-8 text ({err.reason})") from None
    return s

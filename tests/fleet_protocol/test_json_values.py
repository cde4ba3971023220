"""Free-form JSON values of protocol messages: the fast check and the explaining walk agree."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_protocol.json_values import check_json, explain_json, json_ok

any_keys = st.text(st.characters(), max_size=5) | st.integers() | st.just("k" * 257)
edge_values = (st.none() | st.booleans() | st.integers() | st.floats()
               | st.text(st.characters(), max_size=4) | st.just("x" * 1025) | st.just("a\x00")
               | st.tuples(st.integers()) | st.sampled_from([2**63 - 1, 2**63, -(2**63),
                                                             -(2**63) - 1]))
nested_values = st.recursive(edge_values, lambda inner: st.lists(inner, max_size=4)
                             | st.dictionaries(any_keys, inner, max_size=4), max_leaves=40)


@settings(max_examples=500)
@given(st.dictionaries(any_keys, nested_values, max_size=5), st.integers(1, 6),
       st.integers(1, 40))
def test_free_form_fast_check_agrees_with_the_explaining_walk(value: dict[Any, Any],
                                                              depth: int, values: int) -> None:
    """The fast check of metrics/detail/args (key sets cached, one pass) passes exactly what
    the value-by-value walk that writes the error messages passes."""
    try:
        explain_json(value, (depth, values))
        explained_ok = True
    except ValueError:
        explained_ok = False
    assert json_ok(value, depth, values) == explained_ok


@pytest.mark.parametrize(("value", "limits", "words"), [
    ({"a": {"b": {"c": 1}}}, (2, 100), "at a.b: nested 3 levels deep, at most 2 allowed"),
    ({"a": list(range(10))}, (3, 5), "holds more than 5 values"),
    ({"a": "x\x00"}, (3, 100), "at a: string contains a NUL character"),
    ({"k" * 257: 1}, (3, 100), "key of 257 characters, at most 256 allowed"),
    ({"a": [1, 2**63]}, (3, 100), "at a.1: integer 9223372036854775808 does not fit in 64 bits"),
    ({"a": float("nan")}, (3, 100), "at a: nan is not a finite number (use null)"),
    ({"a": {1, 2}}, (3, 100), "at a: set"),
])
def test_a_refused_value_is_named_with_its_path(value: dict[str, Any], limits: tuple[int, int],
                                                words: str) -> None:
    """check_json passes a good value through and names the path of what is wrong in a bad one."""
    assert check_json({"a": [1, "b", None, 2.5, {"c": True}]}, (3, 100))["a"][1] == "b"
    with pytest.raises(ValueError, match=re.escape(words)):
        check_json(value, limits)

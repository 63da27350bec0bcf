"""regroup.validation: the checks the core and the adapters share accept exactly their
documented range, and their errors name the parameter, the caller, the range and the value."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regroup.validation import check_block, check_int, check_real

ENDS = st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 1.0, math.inf])


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=True), st.integers(-10, 10),
                       st.sampled_from([0.0, 1.0, -1.0, 0.5, math.inf, -math.inf])),
       low=ENDS, high=ENDS, low_open=st.booleans(), high_open=st.booleans())
def test_check_real_accepts_exactly_its_interval(value, low, high, low_open, high_open):
    if low > high:
        low, high = high, low
    inside = (not math.isnan(value) and (value > low or (value == low and not low_open))
              and (value < high or (value == high and not high_open)))
    if inside:
        got = check_real(value, "x", "f", low, high, low_open=low_open, high_open=high_open)
        assert got == value and type(got) is float
    else:
        with pytest.raises(ValueError, match=r"^The 'x' parameter of f must be a .*float.*"
                                             r"\. Got .* instead\.$"):
            check_real(value, "x", "f", low, high, low_open=low_open, high_open=high_open)


@pytest.mark.parametrize("args, kwargs, text", [
    ((0, 1), {"high_open": True}, "a float in [0, 1)"),
    ((0, 1), {"low_open": True}, "a float in (0, 1]"),
    ((0, math.inf), {"low_open": True, "high_open": True}, "a finite float > 0"),
    ((0, math.inf), {}, "a float >= 0"),
    ((-math.inf, 2), {}, "a float <= 2"),
    ((), {}, "a float"),
    ((0, 1), {"optional": True}, "a float in [0, 1] or None"),
])
def test_check_real_says_what_it_wanted(args, kwargs, text):
    with pytest.raises(TypeError, match=f"^The 'lr' parameter of recover must be "
                                        f"{__import__('re').escape(text)}. Got '1' instead."):
        check_real("1", "lr", "recover", *args, **kwargs)


def test_check_real_types_and_none():
    for bad in (True, "0.5", None, [0.5], 1j):
        with pytest.raises(TypeError, match="'x' parameter of f"):
            check_real(bad, "x", "f", 0, 1)
    assert check_real(None, "x", "f", 0, 1, optional=True) is None
    assert check_real(np.float32(0.25), "x", "f", 0, 1) == 0.25
    assert check_real(np.int64(1), "x", "f", 0, 1) == 1.0
    with pytest.raises(ValueError, match="Got 10000"):     # beyond the float range
        check_real(10 ** 400, "x", "f", 0, 1)
    assert check_real(10 ** 400, "x", "f", 0) == math.inf


def test_check_int():
    assert check_int(np.int64(3), "n", "f", low=1) == 3
    assert check_int(None, "n", "f", low=1, optional=True) is None
    with pytest.raises(ValueError, match=r"^The 'n' parameter of f must be an int >= 1 or "
                                         r"None\. Got 0 instead\.$"):
        check_int(0, "n", "f", low=1, optional=True)
    with pytest.raises(ValueError, match=r"must be an int in \[0, 2\]\. Got 3"):
        check_int(3, "n", "f", low=0, high=2)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match=r"'n' parameter of f must be an int >= 1\. Got"):
            check_int(bad, "n", "f", low=1)


def test_check_block():
    assert check_block(16, "f") == (16, 16)
    assert check_block("32x16", "f") == (32, 16)
    assert check_block([8, 4], "f") == (8, 4)
    for bad, kind in [(0, ValueError), ((16, 0), ValueError), (True, TypeError),
                      (16.0, TypeError), ("sixteen", ValueError), ((1, 2, 3), TypeError)]:
        with pytest.raises(kind, match="'block' parameter of f"):
            check_block(bad, "f")

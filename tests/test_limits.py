"""The checks of mipadapter.limits: what passes, what is refused, and the one-line messages."""

from __future__ import annotations

import math

import pytest

from mipadapter.limits import (
    ALLOW_LARGE,
    DEFAULT_LIMITS,
    LARGE_LIMITS,
    SEED_RANGE,
    LimitError,
    Limits,
    check_guidance,
    check_integer,
    check_number,
    check_output_pixels,
    check_scale,
    check_seed,
    check_side,
    check_steps,
)


@pytest.mark.parametrize("value", [float("nan"), math.inf, -math.inf, 10**400, "3", True, None, [1]])
def test_a_number_that_is_not_a_finite_float_is_refused(value):
    with pytest.raises(LimitError, match=r"^x must be a finite number between 0 and 30, got "):
        check_number(value, "x", 0, 30)


@pytest.mark.parametrize("value", [2.0, True, "2", None, 2**70 + 0.5])
def test_an_integer_check_takes_only_integers(value):
    with pytest.raises(LimitError, match=r"^n must be an integer between 1 and 100, got "):
        check_integer(value, "n", 1, 100)


def test_the_hint_names_the_flag_only_when_it_would_help():
    assert check_steps(100) == 100 and check_steps(150, limits=LARGE_LIMITS) == 150
    with pytest.raises(LimitError) as above_cap:
        check_steps(150, allow=ALLOW_LARGE)
    assert str(above_cap.value) == "--steps must be an integer between 1 and 100, got 150 (--allow-large allows up to 10000)"
    with pytest.raises(LimitError) as above_ceiling:
        check_steps(10**9, allow=ALLOW_LARGE)
    assert str(above_ceiling.value) == "--steps must be an integer between 1 and 100, got 1000000000"
    with pytest.raises(LimitError) as below:
        check_steps(0, allow=ALLOW_LARGE)
    assert str(below.value) == "--steps must be an integer between 1 and 100, got 0"
    with pytest.raises(LimitError) as web:  # the web has no flag to offer
        check_guidance(31, "Guidance")
    assert str(web.value) == "Guidance must be a finite number between 0 and 30, got 31"


def test_sides_and_output_pixels_follow_the_limits():
    limits = Limits(min_side=256, max_side=768, side_multiple=64)
    assert check_side(512, "w", limits) == 512
    for bad in (192, 832, 500, 512.0):
        with pytest.raises(LimitError, match=r"^w must be a multiple of 64 between 256 and 768 pixels, got "):
            check_side(bad, "w", limits)
    check_output_pixels(1536, 1536)  # the default cap is max_side²
    with pytest.raises(LimitError, match=r"^the output size 8192×4096 is 33\.6 MP, above the limit of 16\.8 MP$"):
        check_output_pixels(8192, 4096, LARGE_LIMITS)


def test_one_seed_range_and_scale_bounds():
    assert check_seed(SEED_RANGE[1]) == 2**64 - 1 and check_seed(0) == 0
    for bad in (-1, 2**64):
        with pytest.raises(LimitError, match=r"^--seed must be an integer between 0 and 18446744073709551615"):
            check_seed(bad)
    assert check_scale(1.5, "s") == 1.5 and DEFAULT_LIMITS.max_scale == 1.5
    with pytest.raises(LimitError, match=r"^s must be a finite number between 0 and 1\.5, got 1e\+39$"):
        check_scale(1e39, "s")

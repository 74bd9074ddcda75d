"""One formatter of durations and sizes for every page, table and log line."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigexec.human import duration, size


@pytest.mark.parametrize(("seconds", "page", "table"), [
    (0.0123, "12.3 ms", "12ms"),
    (0.9994, "999.4 ms", "999ms"),
    (1.0, "1.0 s", "1s"),
    (42.0, "42.0 s", "42s"),
    (119.4, "119.4 s", "119s"),
    (120.0, "2.0 min", "2m"),
    (600.0, "10.0 min", "10m"),
    (7200.0, "2.0 h", "2.0h"),
    (12600.0, "3.5 h", "3.5h"),
    (172800.0, "2.0 d", "2.0d"),
    (-600.0, "-10.0 min", "-10m"),
])
def test_durations_switch_units_at_the_same_points_on_pages_and_in_tables(seconds, page, table):
    assert duration(seconds) == page
    assert duration(seconds, compact=True) == table


def test_a_duration_that_is_not_a_number_is_a_dash():
    assert duration(math.nan) == duration(math.inf) == duration(-math.inf, compact=True) == "-"


@given(st.floats(min_value=0, max_value=1e9))
def test_a_compact_duration_is_one_word(seconds):
    # the `bigexec ec2 ls` table splits its rows at spaces
    assert " " not in duration(seconds, compact=True)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (3 * 1024 ** 3, "3.0 GiB"), (2 * 1024 ** 6, "2048.0 PiB"), (-2048, "-2.0 KiB"),
])
def test_sizes_are_in_binary_units(n, text):
    assert size(n) == text

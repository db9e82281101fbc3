"""Maintenance windows and durations (pure): weekly in a zone across DST, one-off, time left."""

from __future__ import annotations

import datetime as dt

import pytest

from engine import errors
from workflows.cycle.windows import Schedule, parse_duration, parse_window

UTC = dt.UTC


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def test_a_weekly_window_in_a_zone_follows_its_wall_clock_across_dst() -> None:
    berlin = Schedule.parse(["Sat 22:00/8h Europe/Berlin"])
    # winter: 22:00 CET is 21:00 UTC; summer: 22:00 CEST is 20:00 UTC
    assert berlin.next_opening(at(2026, 11, 23), long_enough=dt.timedelta(0)) == at(
        2026, 11, 28, 21
    )
    assert berlin.next_opening(at(2026, 6, 1), long_enough=dt.timedelta(0)) == at(2026, 6, 6, 20)


def test_time_left_is_counted_inside_an_open_window_and_none_outside() -> None:
    berlin = Schedule.parse(["Sat 22:00/8h Europe/Berlin"])
    assert berlin.time_left(at(2026, 11, 28, 23)) == dt.timedelta(hours=6)
    assert berlin.time_left(at(2026, 11, 28, 20)) is None
    assert Schedule().time_left(at(2026, 1, 1)) == dt.timedelta.max  # no windows: always open


def test_the_next_opening_skips_windows_too_short_for_the_estimate() -> None:
    both = Schedule.parse(["Tue 02:00/1h UTC", "Sat 22:00/8h UTC"])
    now = at(2026, 11, 23)  # a Monday
    assert both.next_opening(now, long_enough=dt.timedelta(minutes=30)) == at(2026, 11, 24, 2)
    assert both.next_opening(now, long_enough=dt.timedelta(hours=2)) == at(2026, 11, 28, 22)
    assert both.next_opening(now, long_enough=dt.timedelta(hours=9)) is None


def test_a_one_off_window_with_an_offset() -> None:
    once = Schedule.parse(["2026-11-28T22:00+01:00/8h"])
    assert once.next_opening(at(2026, 11, 1), long_enough=dt.timedelta(hours=1)) == at(
        2026, 11, 28, 21
    )
    assert once.time_left(at(2026, 11, 29, 4)) == dt.timedelta(hours=1)
    assert once.next_opening(at(2026, 12, 1), long_enough=dt.timedelta(0)) is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("8h", 28800), ("90m", 5400), ("1h30m", 5400), ("2d", 172800), ("45", 45)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("Sat 25:00/8h", "is not a time of day"),
        ("Sat 22:00/8h Mars/Olympus", "unknown time zone"),
        ("Sat 22:00/8x", "is not a duration"),
        ("sometime", "is not a window"),
        ("Sat 22:00/9d", "between 1s and 7 days"),
    ],
)
def test_a_bad_window_is_named_with_what_was_expected(spec: str, says: str) -> None:
    with pytest.raises(errors.UsageError, match=says):
        parse_window(spec, "cycle.windows[0]")

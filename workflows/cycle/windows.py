"""Maintenance windows and durations, parsed once at the edge.

A window is weekly, `"Sat 22:00/8h"` with an optional IANA time zone after it
(`"Sat 22:00/8h Europe/Berlin"`; the machine's zone otherwise), or one-off,
`"2026-11-28T22:00+01:00/8h"`. Recurrences come from dateutil's rrule and zones from zoneinfo
(tzdata), so daylight saving time moves a weekly window's UTC instant as it does its wall clock.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil import rrule, tz

from engine import errors

_DAYS = {
    "mon": rrule.MO,
    "tue": rrule.TU,
    "wed": rrule.WE,
    "thu": rrule.TH,
    "fri": rrule.FR,
    "sat": rrule.SA,
    "sun": rrule.SU,
}
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_WEEKLY = re.compile(r"^([A-Za-z]{3})[a-z]*\s+(\d{1,2}):(\d{2})/(\S+)(?:\s+(\S+))?$")
FORMS = '"Sat 22:00/8h", "Sat 22:00/8h Europe/Berlin" or "2026-11-28T22:00+01:00/8h"'


def parse_duration(text: str, where: str = "duration") -> dt.timedelta:
    """`8h`, `90m`, `1h30m`, `2d`, `45s`, or plain seconds (`600`)."""
    raw = str(text).strip().lower()
    if raw.replace(".", "", 1).isdigit():
        return dt.timedelta(seconds=float(raw))
    found = _DURATION.match(raw)
    if not raw or found is None or not any(found.groups()):
        raise errors.UsageError(
            f"{where}: {text!r} is not a duration (expected e.g. 30m, 8h, 1h30m, 2d or seconds)"
        )
    d, h, m, s = (int(g or 0) for g in found.groups())
    return dt.timedelta(days=d, hours=h, minutes=m, seconds=s)


def show_duration(delta: dt.timedelta) -> str:
    total = int(delta.total_seconds())
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    parts.append(f"{seconds}s" if seconds or not any(parts) else "")
    return "".join(parts)


@dataclass(frozen=True)
class Window:
    spec: str
    length: dt.timedelta
    start: dt.datetime | None = None  # one-off
    weekday: int | None = None  # weekly: index into _DAYS
    hour: int = 0
    minute: int = 0
    zone: dt.tzinfo | None = None

    def openings(self, after: dt.datetime) -> Iterator[tuple[dt.datetime, dt.datetime]]:
        """The window's (start, end) intervals that end after `after`, in order (UTC)."""
        if self.start is not None:
            end = self.start + self.length
            if end > after:
                yield self.start.astimezone(dt.UTC), end.astimezone(dt.UTC)
            return
        zone = self.zone or tz.tzlocal()
        begin = (after - self.length - dt.timedelta(days=8)).astimezone(zone)
        weekly = rrule.rrule(
            rrule.WEEKLY,
            byweekday=list(_DAYS.values())[self.weekday or 0],
            byhour=self.hour,
            byminute=self.minute,
            bysecond=0,
            dtstart=begin.replace(microsecond=0),
        )
        for found in weekly:
            start = found.replace(tzinfo=zone) if found.tzinfo is None else found
            utc = start.astimezone(dt.UTC)
            if utc + self.length > after:
                yield utc, utc + self.length


def parse_window(spec: str, where: str = "window") -> Window:
    text = " ".join(str(spec).split())
    weekly = _WEEKLY.match(text)
    if weekly:
        day, hour, minute, length, zone_name = weekly.groups()
        if day.lower() not in _DAYS:
            raise errors.UsageError(f"{where}: {spec!r}: unknown day {day!r} (expected {FORMS})")
        if int(hour) > 23 or int(minute) > 59:
            raise errors.UsageError(f"{where}: {spec!r}: {hour}:{minute} is not a time of day")
        zone: dt.tzinfo | None = None
        if zone_name:
            try:
                zone = ZoneInfo(zone_name)
            except (ZoneInfoNotFoundError, ValueError):
                raise errors.UsageError(
                    f"{where}: {spec!r}: unknown time zone {zone_name!r} (an IANA name such as "
                    "Europe/Berlin)"
                ) from None
        return Window(
            spec=text,
            length=_length(length, spec, where),
            weekday=list(_DAYS).index(day.lower()),
            hour=int(hour),
            minute=int(minute),
            zone=zone,
        )
    start_text, slash, length = text.partition("/")
    try:
        start = dt.datetime.fromisoformat(start_text)
    except ValueError:
        start = None
    if not slash or start is None:
        raise errors.UsageError(f"{where}: {spec!r} is not a window (expected {FORMS})")
    if start.tzinfo is None:
        start = start.astimezone()  # the machine's zone
    return Window(spec=text, length=_length(length, spec, where), start=start)


def _length(text: str, spec: str, where: str) -> dt.timedelta:
    length = parse_duration(text, f"{where}: {spec!r}: length")
    if length <= dt.timedelta(0) or length > dt.timedelta(days=7):
        raise errors.UsageError(f"{where}: {spec!r}: the length must be between 1s and 7 days")
    return length


@dataclass(frozen=True)
class Schedule:
    """A set of windows (none: always open)."""

    windows: tuple[Window, ...] = ()

    @classmethod
    def parse(cls, specs: Sequence[str], where: str = "windows") -> Schedule:
        return cls(tuple(parse_window(s, f"{where}[{i}]") for i, s in enumerate(specs)))

    def time_left(self, now: dt.datetime) -> dt.timedelta | None:
        """Time left in the open window that lasts longest from `now`; None when no window
        is open. Without windows: unbounded (`dt.timedelta.max`)."""
        if not self.windows:
            return dt.timedelta.max
        ends = [
            end
            for w in self.windows
            for start, end in _first(w.openings(now))
            if start <= now < end
        ]
        return max(ends) - now if ends else None

    def next_opening(self, now: dt.datetime, *, long_enough: dt.timedelta) -> dt.datetime | None:
        """The first window start after `now` whose window is at least `long_enough`."""
        starts = [
            start
            for w in self.windows
            if w.length >= long_enough
            for start, _end in _first(w.openings(now), 3)
            if start > now
        ]
        return min(starts) if starts else None

    def longest(self) -> dt.timedelta:
        return max((w.length for w in self.windows), default=dt.timedelta.max)


def _first(
    intervals: Iterator[tuple[dt.datetime, dt.datetime]], n: int = 2
) -> list[tuple[dt.datetime, dt.datetime]]:
    out = []
    for interval in intervals:
        out.append(interval)
        if len(out) == n:
            break
    return out

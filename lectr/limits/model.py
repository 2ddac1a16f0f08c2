"""What a limit is: the five caps of a scope (an org or a Lectr key), their
validation, the windows they count in (UTC minutes, UTC days, calendar
months), and the OpenAI-style duration format of the reset headers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from lectr.errors import BadRequest

FIELDS = ("rpm", "tpm", "max_concurrent", "usd_per_day", "usd_per_month")
MICRO = 1_000_000  # amounts of USD are counted in micro-dollars
MAX_COUNT = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "max_concurrent": 1_000_000}
MAX_USD = Decimal(1_000_000_000)
_USD_TEXT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,6})?")


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps of one scope; None: no limit."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    usd_per_day: Decimal | None = None
    usd_per_month: Decimal | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in FIELDS)


def to_micro(usd: Decimal) -> int:
    """USD as whole micro-dollars, rounded up (a reservation or a cost is
    never counted short)."""
    return usd.scaleb(6).__ceil__()


def from_micro(micro: int) -> Decimal:
    return Decimal(micro) / MICRO


def usd_text(value: Decimal | int) -> str:
    """'12.50'-style text of an amount (at least two decimals, at most six)."""
    amount = from_micro(value) if isinstance(value, int) else value
    text = f"{amount:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def clean_usd(value: object, what: str) -> Decimal:
    """A positive amount of USD with at most six decimals, from a JSON
    number or a decimal string."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise BadRequest(f"{what} must be an amount of USD (a number or a decimal string)")
    if isinstance(value, str):
        if not _USD_TEXT.fullmatch(value.strip()):
            raise BadRequest(f'{what} must be a decimal amount such as "12.50"')
        amount = Decimal(value.strip())
    else:
        try:
            amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        except InvalidOperation:
            raise BadRequest(f"{what} must be a finite amount of USD") from None
    if not amount.is_finite():
        raise BadRequest(f"{what} must be a finite amount of USD")
    if amount <= 0 or amount > MAX_USD:
        raise BadRequest(f"{what} must be more than 0 and at most {MAX_USD}")
    if amount != amount.quantize(Decimal("0.000001")):
        raise BadRequest(f"{what} may have at most six decimal places")
    return amount


def clean_changes(body: object) -> dict:
    """The fields of a limits update, checked: whole numbers from 1 for
    counts, positive amounts for budgets, None to remove a limit."""
    if not isinstance(body, dict) or not body:
        raise BadRequest(f"give at least one of {', '.join(FIELDS)}")
    out: dict = {}
    for name, value in body.items():
        if name not in FIELDS:
            shown = name if len(str(name)) <= 40 else str(name)[:40] + "…"
            raise BadRequest(f"unknown field {shown!r}")
        if value is None:
            out[name] = None
        elif name in MAX_COUNT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"{name} must be a whole number or null")
            if not 1 <= value <= MAX_COUNT[name]:
                raise BadRequest(f"{name} must be from 1 to {MAX_COUNT[name]}")
            out[name] = value
        else:
            out[name] = clean_usd(value, name)
    return out


# --- windows -----------------------------------------------------------------------


def minute_window(now: float) -> tuple[float, float]:
    start = math.floor(now / 60.0) * 60.0
    return start, start + 60.0


def day_window(now: float) -> tuple[float, float]:
    start = math.floor(now / 86400.0) * 86400.0
    return start, start + 86400.0


def month_window(now: float) -> tuple[float, float]:
    d = datetime.fromtimestamp(now, UTC)
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    end = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp()


def as_datetime(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def reset_text(seconds: float) -> bytes:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it:
    ``250ms``, ``12s``, ``6m0s``, ``1h2m3.5s``."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return b"%dms" % ms
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    out = ""
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return (out + secs + "s").encode()

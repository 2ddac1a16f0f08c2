"""How long a provider asks Lectr to leave a key alone: ``retry-after-ms``,
``retry-after`` in seconds or as an HTTP date; anything else is absent."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from hypothesis import given
from hypothesis import strategies as st

from lectr.http.headers import HeaderList
from lectr.policy.health import parse_retry_after

NOW = datetime(2026, 12, 2, 9, 0, 0, tzinfo=UTC).timestamp()


def h(**fields: str | bytes) -> HeaderList:
    return HeaderList(
        [
            (name.replace("_", "-").encode(), v if isinstance(v, bytes) else v.encode())
            for name, v in fields.items()
        ]
    )


def test_the_forms_providers_send():
    assert parse_retry_after(h(retry_after="20"), NOW) == 20.0
    assert parse_retry_after(h(retry_after=" 1.5 "), NOW) == 1.5
    assert parse_retry_after(h(retry_after_ms="250"), NOW) == 0.25
    # OpenAI sends both: the precise one wins
    assert parse_retry_after(h(retry_after="1", retry_after_ms="450"), NOW) == 0.45
    assert parse_retry_after(h(retry_after="Wed, 02 Dec 2026 09:00:30 GMT"), NOW) == 30.0
    assert parse_retry_after(h(retry_after="Wed, 02 Dec 2026 08:59:00 GMT"), NOW) == 0.0  # past
    assert parse_retry_after(h(), NOW) is None


@given(seconds=st.integers(min_value=0, max_value=10**7))
def test_an_http_date_is_the_time_left(seconds):
    when = datetime.fromtimestamp(NOW + seconds, UTC)
    assert parse_retry_after(h(retry_after=format_datetime(when, usegmt=True)), NOW) == seconds


@given(
    value=st.binary(max_size=40).filter(
        lambda b: b.strip() and not _is_number(b) and b"," not in b and b"GMT" not in b
    )
)
def test_anything_else_is_absent(value):
    assert parse_retry_after(h(retry_after=value, retry_after_ms=value), NOW) is None


@given(st.sampled_from([b"-1", b"nan", b"NaN", b"inf", b"-inf", b"1e999", b"", b" "]))
def test_no_negative_infinite_or_missing_wait(value):
    assert parse_retry_after(h(retry_after=value, retry_after_ms=value), NOW) is None


def _is_number(b: bytes) -> bool:
    try:
        float(b.strip())
    except ValueError:
        return False
    return True


@given(st.sampled_from([b"1_000", b"1e3", b"+5", b"5.", b".5", b"0x10", b"\xd9\xa1", b"1 000"]))
def test_only_digits_are_a_delay(value):
    """delay-seconds is digits (a decimal part tolerated): not whatever else
    float() reads ("1_000" would be 1,000 s, "1e3" too)."""
    assert parse_retry_after(h(retry_after_ms=value), NOW) is None
    assert parse_retry_after(h(retry_after=value), NOW) is None

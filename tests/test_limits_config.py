"""The limits and alert settings: parsed, checked together, never echoing
the webhook secret."""

from __future__ import annotations

import pytest

from lectr.config import ConfigError, load_config

SECRET = "whsec-0123456789abcdef"


def config(**env: str):
    return load_config({}, env)


def test_defaults():
    c = config()
    assert (c.limits_fail_closed, c.limits_lease_fraction) == (False, 0.05)
    assert (c.alert_webhook_url, c.alert_webhook_secret) == (None, None)


def test_values():
    c = config(
        LECTR_LIMITS_FAIL_CLOSED="yes",
        LECTR_LIMITS_LEASE_FRACTION="0.2",
        LECTR_ALERT_WEBHOOK_URL=" https://hooks.example.com/lectr?token=abc ",
        LECTR_ALERT_WEBHOOK_SECRET=SECRET,
    )
    assert c.limits_fail_closed is True and c.limits_lease_fraction == 0.2
    assert c.alert_webhook_url == "https://hooks.example.com/lectr?token=abc"
    assert c.alert_webhook_secret.reveal() == SECRET
    assert SECRET not in repr(c)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"LECTR_LIMITS_LEASE_FRACTION": "0"}, "above 0 and at most 1"),
        ({"LECTR_LIMITS_LEASE_FRACTION": "1.5"}, "above 0 and at most 1"),
        ({"LECTR_LIMITS_LEASE_FRACTION": "half"}, "expected a number"),
        ({"LECTR_LIMITS_FAIL_CLOSED": "maybe"}, "LECTR_LIMITS_FAIL_CLOSED is malformed"),
        ({"LECTR_ALERT_WEBHOOK_URL": "ftp://x"}, "expected an http(s):// URL"),
        (
            {"LECTR_ALERT_WEBHOOK_URL": "https://u:p@x/hook", "LECTR_ALERT_WEBHOOK_SECRET": SECRET},
            "must not carry credentials",
        ),
        ({"LECTR_ALERT_WEBHOOK_URL": "https://x/hook"}, "LECTR_ALERT_WEBHOOK_SECRET is not"),
        (
            {"LECTR_ALERT_WEBHOOK_URL": "https://x/hook", "LECTR_ALERT_WEBHOOK_SECRET": "short"},
            "at least 16 characters",
        ),
    ],
)
def test_bad_values_are_one_clear_line(env, message):
    with pytest.raises(ConfigError) as e:
        config(**env)
    assert message in str(e.value)
    assert "short" not in str(e.value) and "u:p" not in str(e.value)

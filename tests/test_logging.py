"""The JSON log format: newline-delimited JSON, no secrets."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, formatEvent

from lectr.logging import json_lines_observer
from lectr.util.secret import Secret


def test_one_json_object_per_line():
    out = io.StringIO()
    log = Logger(namespace="lectr.test", observer=json_lines_observer(out))
    log.info("proxied {provider} {status}", provider="openai", status=200)
    log.warn("key {key}", key=Secret("lc_not-to-be-seen"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])  # no RFC 7464 record separator in front
    assert (first["provider"], first["status"], first["log_namespace"]) == (
        "openai",
        200,
        "lectr.test",
    )
    assert "lc_not-to-be-seen" not in out.getvalue()


def test_log_level_is_the_level_name():
    out = io.StringIO()
    log = Logger(namespace="lectr.test", observer=json_lines_observer(out))
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    log.critical("c")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("f")
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["log_level"] for d in docs] == [
        "debug",
        "info",
        "warn",
        "error",
        "critical",
        "critical",
    ]
    assert all("log_logger" not in d for d in docs)
    assert "ZeroDivisionError" in json.dumps(docs[-1]["log_failure"])
    # still readable by Twisted's own formatter
    assert formatEvent(docs[0]) == "d"

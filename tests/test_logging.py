"""The JSON log format: newline-delimited JSON, no secrets."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger

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

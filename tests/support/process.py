"""Running the real ``twistd lectr`` in a subprocess, for start-up and
end-to-end tests. Ports are ``tcp:0`` by default and read back from the
process's log ("proxy listening on 0.0.0.0:PORT")."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_LISTEN_RE = re.compile(r"(proxy|admin API) (?:listening on|socket bound to) ([\d.:a-f]+):(\d+)")


def new_master_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def lectr_command(*args: str, pidfile: str | None = "") -> list[str]:
    """``twistd --nodaemon lectr ARGS``; ``pidfile`` None keeps twistd's
    default (``twistd.pid`` in the working directory)."""
    twistd = ["--nodaemon"] if pidfile is None else ["--nodaemon", f"--pidfile={pidfile}"]
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        *twistd,
        "lectr",
        *args,
    ]


def base_env(**overrides: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LECTR_", "ENCRYPTION_KEY", "AUTH0_")) and k != "DATABASE_URL"
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["LECTR_PROXY_LISTEN"] = "tcp:0:interface=127.0.0.1"
    env["LECTR_ADMIN_LISTEN"] = "tcp:0:interface=127.0.0.1"
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class LectrProcess:
    """A running ``twistd -n lectr``; collects its output."""

    def __init__(
        self, env: dict[str, str], cwd: Path, args: tuple[str, ...] = (), pidfile: str | None = ""
    ) -> None:
        self.cwd = cwd
        self.proc = subprocess.Popen(
            lectr_command(*args, pidfile=pidfile),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._ready = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._pump, args=(self.proc.stdout, self.stdout_lines), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.proc.stderr, self.stderr_lines), daemon=True
            ),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            m = _LISTEN_RE.search(line)
            if m:
                self.ports["proxy" if m.group(1) == "proxy" else "admin"] = int(m.group(3))
            if "Lectr is ready" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.stdout_lines + self.stderr_lines)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                return
            if self.proc.poll() is not None:
                break
        raise AssertionError(f"Lectr did not become ready:\n{self.output}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def stop_cleanly(self, timeout: float = 60.0) -> None:
        """SIGTERM, and check the shutdown was orderly. twistd ends by
        re-raising the signal that stopped it, so the exit status is -SIGTERM."""
        code = self.stop(timeout)
        assert code in (0, -signal.SIGTERM), f"exit status {code}:\n{self.output}"
        assert "Server Shut Down." in self.output, self.output
        assert "Traceback" not in self.output, self.output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def url(self, which: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[which]}{path}"

    def wait_for_output(self, needle: str, timeout: float = 60.0) -> None:
        """Until ``needle`` is in the output (the process must stay up)."""
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            assert time.monotonic() < deadline, self.output
            assert self.proc.poll() is None, self.output
            time.sleep(0.1)

    def admin(self, token: str, method: str, path: str, body: dict) -> dict:
        """One admin API call with ``token``; its JSON answer."""
        request = urllib.request.Request(
            self.url("admin", path),
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def start_stream(
        self, token: str, provider_key: str, org_name: str = "Streams"
    ) -> tuple[threading.Thread, threading.Event, dict]:
        """A new org with ``provider_key`` for OpenAI, and a streamed chat
        completion through the proxy with its key, read in a thread: the
        thread, an event set at the first bytes (or a failure), and the
        outcome (``status`` and ``body``, or ``error``)."""
        org = self.admin(token, "POST", "/admin/orgs", {"name": org_name})
        key = org["key"]["key"]
        self.admin(
            token,
            "POST",
            f"/admin/orgs/{org['org']['id']}/provider-keys",
            {"provider": "openai", "key": provider_key},
        )
        first_bytes = threading.Event()
        outcome: dict = {}
        port = self.ports["proxy"]

        def stream() -> None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                body = {"model": "gpt-4o-mini", "stream": True, "messages": []}
                conn.request(
                    "POST",
                    "/openai/v1/chat/completions",
                    json.dumps(body),
                    {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                response = conn.getresponse()
                chunks = [response.read1(65536)]
                first_bytes.set()
                while chunk := response.read1(65536):
                    chunks.append(chunk)
                outcome["status"], outcome["body"] = response.status, b"".join(chunks)
            except (OSError, http.client.HTTPException) as e:
                outcome["error"] = repr(e)
                first_bytes.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        return reader, first_bytes, outcome


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeProviderProcess:
    """tests/support/fake_provider.py in a process of its own (for tests
    that run Lectr with twistd and make plain blocking calls)."""

    def __init__(self, interval: float = 0.0) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fake_provider",
                "--port",
                str(self.port),
                "--interval",
                str(interval),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert "fake provider on" in line, line

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

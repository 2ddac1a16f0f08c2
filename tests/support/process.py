"""Running the real ``twistd lectr`` in a subprocess, for start-up and
end-to-end tests. Ports are ``tcp:0`` by default and read back from the
process's log ("proxy listening on 0.0.0.0:PORT")."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
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

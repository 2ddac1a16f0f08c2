"""Cold start of `twistd -n lectr` in development mode (embedded PostgreSQL):
seconds from launching the process to `GET /readyz` answering 200, for a
first run (empty data dir: initdb, migrations, secrets) and a second run
(reusing it).

    python bench/coldstart.py
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(data_dir: Path) -> float:
    admin = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LECTR_", "ENCRYPTION_KEY")) and k != "DATABASE_URL"
    }
    env.update(
        PYTHONPATH=str(REPO),
        LECTR_DATA_DIR=str(data_dir),
        LECTR_PROXY_LISTEN=f"tcp:{free_port()}:interface=127.0.0.1",
        LECTR_ADMIN_LISTEN=f"tcp:{admin}:interface=127.0.0.1",
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "lectr",
        ],
        cwd=data_dir.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() - started > 120:
                raise SystemExit("Lectr did not come up")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lectr-coldstart-"))
    try:
        first = start_once(tmp / "data")
        second = start_once(tmp / "data")
        print(
            f"twistd -n lectr, development mode: first run {first:.2f} s "
            f"(initdb, migrations, secrets), second run {second:.2f} s"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

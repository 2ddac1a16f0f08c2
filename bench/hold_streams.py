"""Open N concurrent streaming requests, wait until each has its first
event, print the resident memory of a process, hold, then close them all.

    python bench/hold_streams.py --url http://127.0.0.1:8080/v1/chat/completions \\
        --key lc_... --count 1000 --rss-pid 1234
"""

import argparse
import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def one(host, port, path, key, ready: asyncio.Event, opened: list, gate, body=BODY):
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), host.encode(), key.encode(), len(body), body)
        )
        await writer.drain()
        data = b""
        try:
            while b"data:" not in data:
                chunk = await asyncio.wait_for(reader.read(4096), 30)
                if not chunk:
                    return
                data += chunk
        except (TimeoutError, OSError):
            writer.close()
            return
    opened.append(writer)
    await ready.wait()
    writer.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--hold", type=float, default=5.0)
    p.add_argument("--rss-pid", type=int, required=True)
    p.add_argument("--body", help="request body (default: a small streaming chat request)")
    a = p.parse_args()
    body = a.body.encode() if a.body else BODY
    u = urlsplit(a.url)
    done = asyncio.Event()
    opened: list = []
    gate = asyncio.Semaphore(256)
    tasks = [
        asyncio.create_task(one(u.hostname, u.port, u.path, a.key, done, opened, gate, body))
        for _ in range(a.count)
    ]
    deadline = time.monotonic() + 120
    while len(opened) < a.count and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if all(t.done() for t in tasks):
            break
    await asyncio.sleep(1.0)  # let the proxy settle
    print(f"open={len(opened)} rss_kib={rss_kib(a.rss_pid)}", flush=True)
    await asyncio.sleep(a.hold)
    done.set()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())

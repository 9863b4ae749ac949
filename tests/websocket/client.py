"""WebSocket clients for tests/websocket.rs, written with Python's `websockets` (Debian:
python3-websockets), a client this crate's authors did not write.

Usage: client.py URL COUNT [CLOSERS]

Opens COUNT connections to URL. Prints `open N` once connection N received its first message
from the server. The first CLOSERS connections (default 0) then close themselves (code 1000)
and print `client closed N`; the others wait for the server to close them and print
`closed N CODE REASON` (CODE 0 if the connection ended without a close frame). Exits once
every connection has ended. Lines are flushed at once: the test timestamps them as they come.
"""

import asyncio
import sys

import websockets


async def client(url: str, n: int, closer: bool) -> None:
    async with websockets.connect(url, open_timeout=10, close_timeout=5) as ws:
        await ws.recv()
        print(f"open {n}", flush=True)
        if closer:
            await ws.close(code=1000, reason="done")
            print(f"client closed {n}", flush=True)
            return
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed as closed:
            frame = closed.rcvd
            if frame is None:
                print(f"closed {n} 0 no-close-frame", flush=True)
            else:
                print(f"closed {n} {frame.code} {frame.reason or '-'}", flush=True)


async def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    closers = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    await asyncio.gather(*(client(url, n, n < closers) for n in range(count)))


if __name__ == "__main__":
    asyncio.run(main())

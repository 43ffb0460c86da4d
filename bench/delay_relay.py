#!/usr/bin/env python3
"""A TCP relay that delays each direction by a fixed time: a long link on loopback.

    python bench/delay_relay.py --target-port 2222 --delay-ms 20     # prints "listening <port>"

Each chunk read from one side is written to the other `delay` seconds after it was read,
in order; the relay adds latency only (40 ms round trip at 20 ms), no bandwidth limit and
no loss. Why not `tc qdisc ... netem`: it needs CAP_NET_ADMIN and changes the host's
loopback for every process on it; this touches only the connections made through it.
Runs until killed (SIGTERM). Memory is bounded by what a side sends within one delay.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

CHUNK = 256 * 1024


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each chunk `delay` after it arrived."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def later() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(later())
    try:
        while True:
            data = await reader.read(CHUNK)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
        writer.close()


async def serve(listen_port: int, target_port: int, delay: float) -> None:
    async def connected(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, sw, delay), pump(sr, cw, delay), return_exceptions=True)

    server = await asyncio.start_server(connected, "127.0.0.1", listen_port)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--target-port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="each way")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.listen_port, args.target_port, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A TCP relay that holds every byte for a fixed one-way delay: propagation delay without ``tc netem``.

This kernel has no ``netem``, so the validation testbed adds its RTT here: the relay runs in the cloud
namespace, accepts the edge's connection on the veth address, opens its own connection to the verifier
on loopback and copies bytes both ways, each chunk written ``delay`` seconds after it was read (a
per-direction FIFO with timestamps, so order and pacing are kept). Both directions pay ``delay``, so the
RTT the edge sees is 2 x delay plus the shaped link's and loopback's own.

Why userspace and not a qdisc: ``tbf``/``htb`` shape rate but cannot hold packets for a time. Caveat:
the relay terminates TCP, so the edge's TCP sees the veth's sub-millisecond RTT, not the emulated one
(congestion-window growth is faster than on a real long path; HTTP/2 flow control, which is end to end,
does see the full RTT).

    python -m simulate.testbed.relay --listen 10.0.0.2:7000 --target 127.0.0.1:50051 --delay 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

from core.cli import listen_address

READY_PREFIX = "relay listening on "


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` after it arrived."""
    queue: collections.deque = collections.deque()
    ready = asyncio.Event()
    done = False

    async def feed():
        nonlocal done
        while chunk := await reader.read(1 << 16):
            queue.append((time.monotonic() + delay, chunk))
            ready.set()
        done = True
        ready.set()

    feeder = asyncio.create_task(feed())
    try:
        while True:
            while not queue:
                if done:
                    return
                ready.clear()
                await ready.wait()
            due, chunk = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
    finally:
        feeder.cancel()
        if writer.can_write_eof():
            writer.write_eof()


async def _handle(client_r, client_w, target: tuple[str, int], delay: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay),
                         return_exceptions=True)
    for w in (client_w, server_w):
        w.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, target, delay), *listen)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"{READY_PREFIX}{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulate.testbed.relay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=listen_address, required=True, help="HOST:PORT to accept on (port 0 = any)")
    parser.add_argument("--target", type=listen_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, required=True, help="one-way delay in seconds, each direction")
    args = parser.parse_args(argv)
    if not 0 <= args.delay < 10:
        parser.error("--delay must be in [0, 10) seconds")
    try:
        asyncio.run(serve(args.listen, args.target, args.delay))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""A WAN emulator for benchmarks: a TCP relay with a one-way delay and a bandwidth cap per
direction, on loopback only (Python 3.11, stdlib only).

    python3 bench/wan_relay.py --listen 127.0.0.1:7000 --target 127.0.0.1:8080 \
        --delay-ms 50 --rate-mbit 100          # 100 ms RTT, 100 Mbit/s each way

Model, per direction of every connection (a point-to-point link with a bottleneck queue):

    reader ---------------------------------(bounded delay line)--> writer
    reads data as it arrives and stamps its       each chunk is written to the far end at
    departure from a token bucket at --rate-mbit  its departure + --delay-ms, in order

- Token bucket: tokens accrue at the link rate, up to --burst-kb (default 16 KiB, ~1.3 ms at
  100 Mbit/s) while the link is idle; a chunk departs once its bytes are paid for. Departures
  are computed in virtual time from arrival times, so timer lateness or a busy CPU delays a
  single write but never loses link time: the long-run rate is exact.
- A chunk is delivered at departure + delay; a small request costs one delay each way
  (RTT = 2 × delay), a bulk transfer costs size / rate plus one delay.
- Bounded buffers: the delay line holds at most --queue-kb (the bottleneck queue) plus what
  the link carries during the delay (rate × delay) plus two chunks; when full, the relay stops
  reading and TCP back-pressure reaches the sender.

Limits (documented in BENCHMARKS.md): the relay terminates TCP on both sides, so the
endpoints' congestion control sees loopback, not the emulated RTT (no slow start over the
long link, no loss). Round trips of the application protocol and the bandwidth are modelled;
TCP's own dynamics are not.

SIGTERM/SIGINT stop it; with --stats each finished connection logs its bytes and duration.
"""

import argparse
import asyncio
import collections
import ipaddress
import signal
import socket
import sys
import time

CHUNK = 64 * 1024


def parse_addr(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        raise SystemExit(f"wan_relay: {what} must be IP:PORT, got {text!r}")
    if not ip.is_loopback:
        raise SystemExit(f"wan_relay: {what} must be a loopback address (got {host})")
    if not 0 < p < 65536:
        raise SystemExit(f"wan_relay: {what}: bad port {port}")
    return host, p


class ByteQueue:
    """A FIFO bounded in bytes (a put waits while the queue holds `limit` bytes or more; an
    empty queue always accepts one item, so a chunk larger than the limit cannot block)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: collections.deque = collections.deque()
        self.size = 0
        self.cond = asyncio.Condition()

    async def put(self, item, nbytes: int):
        async with self.cond:
            await self.cond.wait_for(lambda: self.size < self.limit or not self.items)
            self.items.append((item, nbytes))
            self.size += nbytes
            self.cond.notify_all()

    async def get(self):
        async with self.cond:
            await self.cond.wait_for(lambda: bool(self.items))
            item, nbytes = self.items.popleft()
            self.size -= nbytes
            self.cond.notify_all()
            return item


class TokenBucket:
    """A token bucket kept in virtual time: tokens accrue at the link rate up to `burst` bytes
    while the link is idle, and a chunk departs when its bytes have been paid for. Departure
    times are computed from the chunk's arrival time, not from when this task happens to run,
    so a late timer or a busy CPU delays single writes but never loses link time: the long-run
    rate is exact."""

    def __init__(self, rate_bps: float, burst: int):
        self.rate = rate_bps / 8.0  # bytes per second
        self.credit = burst / self.rate if self.rate > 0 else 0.0  # seconds of idle credit
        self.free_at = 0.0  # when the link has finished serialising what it was given

    def depart(self, n: int, arrival: float) -> float:
        if self.rate <= 0:
            return arrival
        start = max(self.free_at, arrival - self.credit)
        self.free_at = start + n / self.rate
        return max(self.free_at, arrival)


class Direction:
    def __init__(self, name, reader, writer, rate_bps, delay_s, burst, queue_bytes):
        self.name = name
        self.reader = reader
        self.writer = writer
        self.delay = delay_s
        self.bucket = TokenBucket(rate_bps, burst)
        # Bytes between the reader and the far end: the bottleneck queue plus what is in
        # flight (rate × delay). Full → the relay stops reading (TCP back-pressure).
        in_flight = int(rate_bps / 8 * delay_s) if rate_bps > 0 else 16 * 1024 * 1024
        self.line = ByteQueue(queue_bytes + in_flight + 2 * CHUNK)
        self.bytes = 0
        self.ended = None  # (monotonic time, "eof" | error) when the source stopped

    async def read_loop(self):
        try:
            while True:
                try:
                    data = await self.reader.read(CHUNK)
                except (ConnectionError, OSError) as e:
                    self.ended = (time.monotonic(), type(e).__name__)
                    raise
                now = time.monotonic()
                if not data:
                    self.ended = (now, "eof")
                    break
                departed = self.bucket.depart(len(data), now)
                await self.line.put((data, departed + self.delay), len(data))
        except (ConnectionError, OSError):
            pass
        finally:
            await self.line.put((None, max(self.bucket.free_at, time.monotonic()) + self.delay), 0)

    async def write_loop(self):
        try:
            while True:
                data, due = await self.line.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                self.bytes += len(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass

    def tasks(self):
        return [
            asyncio.create_task(self.read_loop()),
            asyncio.create_task(self.write_loop()),
        ]


async def handle(client_r, client_w, args, conns):
    start = time.monotonic()
    try:
        up_r, up_w = await asyncio.wait_for(
            asyncio.open_connection(args.target[0], args.target[1]), timeout=10
        )
    except (OSError, asyncio.TimeoutError) as e:
        print(f"wan_relay: cannot reach {args.target}: {e}", file=sys.stderr)
        client_w.close()
        return
    for w in (client_w, up_w):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    delay = args.delay_ms / 1000.0
    up = Direction("up", client_r, up_w, args.up_bps, delay, args.burst, args.queue)
    down = Direction("down", up_r, client_w, args.down_bps, delay, args.burst, args.queue)
    # An abrupt end (reset, relay stopping) cancels everything; a clean end is both halves
    # closed in order.
    tasks = up.tasks() + down.tasks()
    conns.add(asyncio.current_task())
    try:
        writers = [tasks[1], tasks[3]]
        await asyncio.gather(*writers)
    except asyncio.CancelledError:
        pass
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (client_w, up_w):
            try:
                w.close()
            except Exception:
                pass
        conns.discard(asyncio.current_task())
        if args.stats:
            dt = time.monotonic() - start
            ends = sorted(
                (e[0], side, e[1]) for side, e in (("client", up.ended), ("target", down.ended)) if e
            )
            first = f"{ends[0][1]} {ends[0][2]}" if ends else "relay stopped"
            print(
                f"wan_relay: {time.strftime('%H:%M:%S', time.gmtime())} conn done in {dt:.2f}s "
                f"up={up.bytes}B down={down.bytes}B "
                f"(down {down.bytes * 8 / max(dt, 1e-9) / 1e6:.1f} Mbit/s), first end: {first}",
                file=sys.stderr,
                flush=True,
            )


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="IP:PORT to listen on (loopback)")
    ap.add_argument("--target", required=True, help="IP:PORT to relay to (loopback)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth each way (0 = unlimited)")
    ap.add_argument("--up-rate-mbit", type=float, help="client→target bandwidth (default --rate-mbit)")
    ap.add_argument("--down-rate-mbit", type=float, help="target→client bandwidth (default --rate-mbit)")
    ap.add_argument("--burst-kb", type=float, default=16.0, help="token bucket size (KiB)")
    ap.add_argument("--queue-kb", type=float, default=256.0, help="bottleneck queue per direction (KiB)")
    ap.add_argument("--stats", action="store_true", help="log each finished connection")
    args = ap.parse_args()
    listen = parse_addr(args.listen, "--listen")
    args.target = parse_addr(args.target, "--target")
    if args.delay_ms < 0 or args.rate_mbit < 0:
        raise SystemExit("wan_relay: --delay-ms and --rate-mbit must be ≥ 0")
    up = args.rate_mbit if args.up_rate_mbit is None else args.up_rate_mbit
    down = args.rate_mbit if args.down_rate_mbit is None else args.down_rate_mbit
    args.up_bps, args.down_bps = up * 1e6, down * 1e6
    args.burst = max(1, int(args.burst_kb * 1024))
    args.queue = max(CHUNK, int(args.queue_kb * 1024))

    conns: set = set()
    try:
        server = await asyncio.start_server(
            lambda r, w: handle(r, w, args, conns), listen[0], listen[1], reuse_address=True
        )
    except OSError as e:
        raise SystemExit(f"wan_relay: cannot listen on {args.listen}: {e.strerror}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"wan_relay: {args.listen} -> {args.target[0]}:{args.target[1]} delay {args.delay_ms} ms "
        f"each way, up {up} Mbit/s, down {down} Mbit/s (0 = unlimited)",
        file=sys.stderr,
        flush=True,
    )
    async with server:
        await stop.wait()
        server.close()
        for t in list(conns):
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())

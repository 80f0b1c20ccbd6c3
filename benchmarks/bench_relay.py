"""The delay relay's own cost and accuracy: Redis direct vs through relay.py, same run.

    .venv/bin/python benchmarks/bench_relay.py [--iterations 3000] [--delay-ms 0.25]

Starts an embedded Redis holding 3,000 rows of 160 bytes (MGET 300 is a 100 x 50
lookup's: 100 entities x 3 views, a 50 kB reply; MGET 3000 a 1,000 x 50 one's, 500 kB),
a relay at delay 0 and one at `--delay-ms` (each its own process), and times PING, MGET
300 and MGET 3000 (a fifth of the iterations), sequential, in alternating blocks of 100
over the three ways to Redis (direct, relay 0, relay delay), with two clients:

    socket    a blocking socket + hiredis parsing: the round trip alone
    pipe      the server's own RedisPipe (featurestore/store/pipe.py) on uvloop

Reports p50/p99 per way, the extra time over direct (through the delay relay it should be
2 x delay: the achieved extra round trip), the relay process's CPU per call, and how
late the delay relay let chunks leave (its counters).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hiredis
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Stats, print_table, run_on_uvloop, write_results
from relay import relay_process

from featurestore.embedded import EmbeddedRedis
from featurestore.store.pipe import RedisPipe

KEYS = [f"recsys:user_profile:{i:012d}".encode() for i in range(3000)]
BLOCK = 100


class SocketClient:
    """A blocking RESP client: one command, wait for its whole reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def call(self, packed: bytes) -> Any:
        self.sock.sendall(packed)
        reply = self.reader.gets()
        while reply is False:
            self.reader.feed(self.sock.recv(1 << 18))
            reply = self.reader.gets()
        return reply


async def measure(args: argparse.Namespace, ports: dict[str, int], cpu: dict[str, Callable[[], float]]) -> list[Any]:
    commands = {"PING": (b"PING",), "MGET 300": (b"MGET", *KEYS[:300]), "MGET 3000": (b"MGET", *KEYS)}
    sockets = {way: SocketClient(port) for way, port in ports.items()}
    pipes = {way: RedisPipe("127.0.0.1", port, timeout_s=5.0) for way, port in ports.items()}
    rows = []
    for command, parts in commands.items():
        packed = hiredis.pack_command(parts)
        calls: dict[tuple[str, str], Callable[[], Awaitable[Any] | Any]] = {}
        for way in ports:
            calls["socket", way] = lambda way=way, packed=packed: sockets[way].call(packed)
            calls["pipe", way] = lambda way=way, parts=parts: pipes[way].execute(*parts)
        samples: dict[tuple[str, str], list[int]] = {key: [] for key in calls}
        cpu_s = dict.fromkeys(calls, 0.0)
        order = list(calls)
        iterations = args.iterations // 5 if command == "MGET 3000" else args.iterations
        for block in range(-2, iterations // BLOCK):  # two blocks of warm-up
            for key in order if block % 2 else order[::-1]:
                call, clock, timed = calls[key], time.perf_counter_ns, block >= 0
                before = cpu[key[1]]()
                for _ in range(BLOCK):
                    start = clock()
                    result = call()
                    if key[0] == "pipe":
                        result = await result
                    if timed:
                        samples[key].append(clock() - start)
                if timed:
                    cpu_s[key] += cpu[key[1]]() - before
        for key, values in samples.items():
            stats = Stats.of(f"{command} {key[0]} {key[1]}", np.array(values))
            direct = Stats.of("", np.array(samples[key[0], "direct"]))
            rows.append(
                {
                    "name": stats.name,
                    "p50 ms": stats.p50_ms,
                    "p99 ms": stats.p99_ms,
                    "+p50 ms": stats.p50_ms - direct.p50_ms,
                    "+p99 ms": stats.p99_ms - direct.p99_ms,
                    "relay cpu us/call": cpu_s[key] / len(values) * 1e6,
                    "stats": stats,
                }
            )
    for pipe in pipes.values():
        await pipe.close()
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        client = redis.Redis(port=server.port)
        client.mset({key: bytes(160) for key in KEYS})
        client.close()
        target = ("127.0.0.1", server.port)
        with relay_process(target, 0.0) as fast, relay_process(target, args.delay_ms, args.spin_us) as slow:
            ports = {"direct": server.port, "relay 0": fast.port, f"relay {args.delay_ms}": slow.port}
            cpu = {"direct": lambda: 0.0, "relay 0": fast.cpu_s, f"relay {args.delay_ms}": slow.cpu_s}
            rows = run_on_uvloop(measure(args, ports, cpu))
            counters = slow.counters()
    return {"delay_ms": args.delay_ms, "spin_us": args.spin_us, "rows": rows, "counters": counters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--delay-ms", type=float, default=0.25)
    parser.add_argument("--spin-us", type=float, default=40.0)
    args = parser.parse_args()
    results = run(args)
    print_table(results["rows"], ["name", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "relay cpu us/call"])
    for direction, c in results["counters"].items():
        print(
            f"delay relay {direction}: {c['chunks']:.0f} chunks, late by {c['late_us_mean']:.1f} us on average;"
            f" under 5 us late {c['late_lt_5us']:.1%}, 5-20 us {c['late_lt_20us']:.1%},"
            f" 20-50 us {c['late_lt_50us']:.1%}, 50 us or more {c['late_ge_50us']:.1%}"
        )
    print("(+ columns: minus the same client's direct figure; through the delay relay, 2 x delay is the aim)")
    for row in results["rows"]:
        row.pop("stats")
    print("wrote", write_results("relay", results))


if __name__ == "__main__":
    main()

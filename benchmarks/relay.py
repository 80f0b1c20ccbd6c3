"""A TCP relay that holds every chunk for a one-way delay: Redis "across a network hop".

    .venv/bin/python benchmarks/relay.py --target 127.0.0.1:6379 --delay-ms 0.25 [--port 0]
    .venv/bin/python benchmarks/bench_relay.py      # its cost and accuracy: PING, MGET 300, 3000

    with redis_hop("redis://127.0.0.1:6379/0", delay_ms=0.25) as hop:   # in a benchmark
        start_server("--redis", hop.url)                                 # 0 ms: no relay at all
        hop.counters()                                                   # chunks each way, lateness
        hop.chunks_sent()                                                # unchanged: no Redis trip

In production Redis is 0.2-1 ms of round trip away (one zone); here it is on loopback and
this machine's kernel has no netem. The relay listens on a loopback port, connects each
client to the target and forwards both directions, each chunk `delay_ms` after it arrived,
in order. It runs in a process of its own (the `relay_process` context manager) so that its
CPU shows separately from the server's. Measured (benchmarks/README.md, "Redis across a
network hop"): at 0.25 ms a PING's round trip grows by 0.55-0.56 ms, a 300-key MGET's by
0.61-0.68 ms; 64-74% of chunks leave under 5 us after their due time.

Why it looks the way it does (measured on this 2-core VM, `bench_relay.py`):
- The delay is counted from the kernel's receive timestamp (SO_TIMESTAMPNS), not from when
  the relay woke up to read: the relay's own wake-up (30-50 us here) hides inside the delay
  instead of adding to it, and a chunk read late (the thread was busy sending) still leaves
  on time.
- asyncio and uvloop timers round to milliseconds (epoll_wait), so an event loop cannot
  hold a chunk 0.25 ms. Each direction of each connection is one thread: it reads a chunk
  (blocking), sleeps until it is due (time.sleep: clock_nanosleep, with the timer slack
  set to 1 ns; the default 50 us slack would make every wait late by up to 50 us), sends
  it, reads the next. What arrives meanwhile waits in the kernel with its own timestamp:
  order and timing hold without a queue. A sleep still ends ~30 us late here (the
  wake-up), so the thread asks to wake that much earlier (a running mean of its own
  overshoot, at most `--spin-us`) and spins the last few us. Its CPU is mostly the two
  wake-ups per chunk (arrival, due time): ~70 us a chunk on this VM. The bytes behind a
  held chunk wait in the socket's receive buffer (autotuned up to tcp_rmem's 32 MB here,
  so it does not stall the sender); a version that read them eagerly into a queue while
  waiting (select with a timeout) cost more CPU per chunk and was no faster, even for a
  3,000-key MGET (500 kB reply).
- One thread per direction: a blocking send only holds back its own direction (what TCP
  does), never the replies of the other.
- Counters (chunks and bytes each way, how late chunks left) live in a small shared file
  per relay, one row per thread (no locks), read by the benchmark without talking to it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import mmap
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Hop", "Relay", "RelayProcess", "add_delay_option", "read_counters", "redis_hop", "relay_process"]

_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not export it
_PR_SET_TIMERSLACK = 29
_ANCILLARY = socket.CMSG_SPACE(16)  # one struct timespec
_BUFFER = 1 << 18
DEFAULT_DELAY_MS = 0.25
DEFAULT_SPIN_US = 40.0

# The counters: one row of int64 per pump thread (a thread writes only its own row).
FIELDS = ("direction", "chunks", "bytes", "late_us_sum", "late_lt_5us", "late_lt_20us", "late_lt_50us", "late_ge_50us")
LATE = FIELDS[4:]
UP, DOWN = 1, 2  # to the target (requests), back to the client (replies)
MAX_ROWS = 1024
COUNTER_BYTES = MAX_ROWS * len(FIELDS) * 8


def _precise_timers() -> None:
    """Timer slack 1 ns for the calling thread (and threads it starts): Linux lets a timed
    wait end up to 50 us late by default, a fifth of the delay modelled."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _arrival_ns(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time of the chunk (CLOCK_REALTIME ns); now when it gave none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return int(seconds) * 1_000_000_000 + int(nanoseconds)
    return time.time_ns()


class Relay:
    """Listen on `host`:`port` (0: any free port), forward each connection to `target`,
    holding every chunk `delay_ms` (one way, each direction) after it arrived.

    Parameters:
        target: (host, port) of the server behind the relay.
        delay_ms: the one-way delay, float milliseconds (0: forward at once).
        spin_us: how long before a chunk is due the waiting thread stops sleeping and spins.
        counters: a writable buffer of COUNTER_BYTES for the counters (None: a private one).

    Example:
        relay = Relay(("127.0.0.1", 6379), delay_ms=0.25)
        relay.start()          # relay.port is where clients connect
        relay.close()
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        delay_ms: float = DEFAULT_DELAY_MS,
        spin_us: float = DEFAULT_SPIN_US,
        host: str = "127.0.0.1",
        port: int = 0,
        counters: memoryview | bytearray | mmap.mmap | None = None,
    ) -> None:
        self.target = target
        self.delay_ns = round(delay_ms * 1e6)
        self.spin_ns = round(spin_us * 1e3)
        self.listener = socket.create_server((host, port))
        self.port: int = self.listener.getsockname()[1]
        self.counters = memoryview(counters if counters is not None else bytearray(COUNTER_BYTES)).cast("q")
        self._rows = itertools.count()
        self._sockets: list[socket.socket] = []
        self._closed = False

    def start(self) -> None:
        """Accept connections on a daemon thread."""
        threading.Thread(target=self._accept_forever, name="relay-accept", daemon=True).start()

    def serve_forever(self) -> None:
        """Accept connections on this thread until the process ends."""
        self._accept_forever()

    def close(self) -> None:
        """Stop accepting and cut every relayed connection: shutdown wakes the threads
        blocked on its sockets, which then close them."""
        self._closed = True
        for sock in [self.listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept_forever(self) -> None:
        _precise_timers()
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()  # the target is down: the client sees its connection closed
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            self._sockets = [s for s in self._sockets if s.fileno() != -1] + [client, upstream]
            connection = _Connection(client, upstream)
            for src, dst, direction in ((client, upstream, UP), (upstream, client, DOWN)):
                row = next(self._rows) % MAX_ROWS
                self.counters[row * len(FIELDS)] = direction
                pump = self._hold if self.delay_ns > 0 else self._forward
                threading.Thread(
                    target=connection.run, args=(pump, src, dst, row), name="relay-pump", daemon=True
                ).start()

    def _forward(self, src: socket.socket, dst: socket.socket, row: int) -> None:
        """Delay 0: each chunk on as soon as it is read (the relay's own cost)."""
        counters, base = self.counters, row * len(FIELDS)
        recv, send = src.recv, dst.sendall
        while data := recv(_BUFFER):
            send(data)
            counters[base + 1] += 1
            counters[base + 2] += len(data)

    def _hold(self, src: socket.socket, dst: socket.socket, row: int) -> None:
        """Each chunk on at its arrival (kernel timestamp) + the delay, in order. What
        arrives meanwhile waits in the kernel: read later, it still has its own stamp."""
        _precise_timers()
        counters, base = self.counters, row * len(FIELDS)
        delay_ns, max_early_ns, clock = self.delay_ns, self.spin_ns, time.time_ns
        # How long a sleep overshoots here (a running mean, at most spin_ns): the thread
        # asks to wake that much before a chunk is due and spins what is left.
        early_ns = max_early_ns // 2
        recvmsg, send, sleep = src.recvmsg, dst.sendall, time.sleep
        while True:
            data, ancillary, _, _ = recvmsg(_BUFFER, _ANCILLARY)
            if not data:
                return
            due = _arrival_ns(ancillary) + delay_ns
            now = clock()
            if due - now > early_ns:
                sleep((due - now - early_ns) / 1e9)
                now = clock()
                early_ns += (min(now - (due - early_ns), max_early_ns) - early_ns) // 8
            while now < due:
                now = clock()
            send(data)
            late_us = (now - due) // 1000
            counters[base + 1] += 1
            counters[base + 2] += len(data)
            counters[base + 3] += late_us
            counters[base + (4 if late_us < 5 else 5 if late_us < 20 else 6 if late_us < 50 else 7)] += 1


class _Connection:
    """One relayed connection: two pumps; the write side of a direction is shut when its
    source ends, both sockets are closed when both pumps are done or either fails."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self.running = 2
        self.lock = threading.Lock()

    def run(self, pump: object, src: socket.socket, dst: socket.socket, row: int) -> None:
        try:
            pump(src, dst, row)  # type: ignore[operator]
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):  # ValueError: a socket closed under the pump
            for sock in self.sockets:  # wakes the other pump
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.running -= 1
            last = self.running == 0
        if last:
            for sock in self.sockets:
                sock.close()


def read_counters(counters: memoryview | bytes | mmap.mmap) -> dict[str, dict[str, float]]:
    """Sum the counter rows per direction: {"up"|"down": {chunks, bytes, late_us_mean and
    the share of chunks that left under 5, 20, 50 us late and 50 us or more}}."""
    view = memoryview(counters).cast("q") if not isinstance(counters, memoryview) else counters
    width = len(FIELDS)
    rows = [view[r * width : (r + 1) * width].tolist() for r in range(MAX_ROWS)]
    out: dict[str, dict[str, float]] = {}
    for name, direction in (("up", UP), ("down", DOWN)):
        mine = [row for row in rows if row[0] == direction]
        total = {field: sum(row[i] for row in mine) for i, field in enumerate(FIELDS)}
        held = max(sum(total[field] for field in LATE), 1)  # the chunks that were held (delay > 0)
        out[name] = {"chunks": total["chunks"], "bytes": total["bytes"], "late_us_mean": total["late_us_sum"] / held}
        out[name].update({field: total[field] / held for field in LATE})
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds process `pid` used so far, all its threads: its process CPU clock
    (Linux: ns resolution; /proc/<pid>/stat counts 10 ms ticks)."""
    return time.clock_gettime((~pid << 3) | 2)  # the kernel's CPUCLOCK_SCHED clock id of a process


class RelayProcess:
    """A relay running in a process of its own (see `relay_process`): where to connect,
    its CPU time and its counters."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, counters_path: Path) -> None:
        self.proc, self.port, self.pid = proc, port, proc.pid
        self._file = counters_path.open("rb")
        self._counters = mmap.mmap(self._file.fileno(), COUNTER_BYTES, access=mmap.ACCESS_READ)
        self._view = memoryview(self._counters).cast("q")

    def cpu_s(self) -> float:
        """CPU seconds the relay process used so far, all its threads, to the ns (Linux)."""
        return cpu_s(self.pid)

    def counters(self) -> dict[str, dict[str, float]]:
        """Chunks and bytes each way and how late they left (read_counters)."""
        return read_counters(bytes(self._counters))

    def chunks_sent(self) -> int:
        """Chunks relayed to the target so far, all connections (~40 us to read): a request
        that made none crossed no hop (its rows came from the server's cache)."""
        view, width = self._view, len(FIELDS)
        return sum(chunks for direction, chunks in zip(view[0::width], view[1::width], strict=True) if direction == UP)

    def close(self) -> None:
        self._view.release()
        self._counters.close()
        self._file.close()


@contextlib.contextmanager
def relay_process(target: tuple[str, int], delay_ms: float, spin_us: float = DEFAULT_SPIN_US) -> Iterator[RelayProcess]:
    """Start `relay.py` in its own process in front of `target`; stop it on exit."""
    with tempfile.TemporaryDirectory(prefix="relay-") as folder:
        counters = Path(folder) / "counters"
        counters.write_bytes(bytes(COUNTER_BYTES))
        cmd = [sys.executable, __file__, "--target", f"{target[0]}:{target[1]}", "--delay-ms", str(delay_ms)]
        cmd += ["--spin-us", str(spin_us), "--counters", str(counters)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()  # "listening on PORT", or EOF when it failed
            if not line.startswith("listening on "):
                raise RuntimeError(f"relay.py did not start (exit code {proc.wait(10)})")
            relay = RelayProcess(proc, int(line.split()[-1]), counters)
            try:
                yield relay
            finally:
                relay.close()
        finally:
            proc.terminate()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


@dataclass
class Hop:
    """The way to Redis a benchmark's server takes: `url`, and the relay when there is one."""

    url: str
    relay: RelayProcess | None = None

    def cpu_s(self) -> float:
        """The relay's CPU seconds so far (0 without a relay)."""
        return self.relay.cpu_s() if self.relay else 0.0

    def counters(self) -> dict[str, dict[str, float]]:
        """The relay's counters (read_counters; empty without a relay)."""
        return self.relay.counters() if self.relay else {}

    def chunks_sent(self) -> int:
        """Chunks relayed to Redis so far (RelayProcess.chunks_sent; 0 without a relay)."""
        return self.relay.chunks_sent() if self.relay else 0


@contextlib.contextmanager
def redis_hop(url: str, delay_ms: float, spin_us: float = DEFAULT_SPIN_US) -> Iterator[Hop]:
    """`url` itself when `delay_ms` is 0 (no relay: loopback as before); else a relay in
    front of that Redis holding each chunk `delay_ms` each way, and the URL through it."""
    if delay_ms <= 0:
        yield Hop(url)
        return
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    with relay_process((host, port), delay_ms, spin_us) as relay:
        netloc = parts.netloc.rpartition("@")[0]
        netloc = f"{netloc}@127.0.0.1:{relay.port}" if netloc else f"127.0.0.1:{relay.port}"
        yield Hop(urlunsplit(parts._replace(netloc=netloc)), relay)


def add_delay_option(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' --redis-delay-ms (one way; 0: no relay, Redis on loopback as before)."""
    parser.add_argument(
        "--redis-delay-ms",
        type=float,
        default=0.0,
        help="put Redis behind benchmarks/relay.py with this one-way delay, ms (0.25: one zone; 0: no relay)",
    )


def serve(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    counters: mmap.mmap | None = None
    if args.counters:
        with open(args.counters, "r+b") as file:
            counters = mmap.mmap(file.fileno(), COUNTER_BYTES)
    _precise_timers()
    relay = Relay((host, int(port)), delay_ms=args.delay_ms, spin_us=args.spin_us, port=args.port, counters=counters)
    print(f"listening on {relay.port}", flush=True)
    relay.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="host:port to relay to")
    parser.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS, help="one-way delay, ms")
    parser.add_argument("--spin-us", type=float, default=DEFAULT_SPIN_US, help="spin this long before a chunk is due")
    parser.add_argument("--port", type=int, default=0, help="where to listen on 127.0.0.1 (0: any free port)")
    parser.add_argument("--counters", help="a file of COUNTER_BYTES to keep the counters in")
    with contextlib.suppress(KeyboardInterrupt):
        serve(parser.parse_args())


if __name__ == "__main__":
    main()

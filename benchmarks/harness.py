"""A small benchmark harness: warm-up, N sequential calls, percentiles, throughput.

    stats = await latency("lookup 100x50", call, iterations=2000)
    rate = await throughput(call, in_flight=32, duration_s=3)

Every figure is compared against a floor measured in the same run (`ratio`), because
this machine's absolute numbers move by tens of percent between runs. Results go to
JSON under benchmarks/results/ with the command line and the machine.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

__all__ = ["Side", "Stats", "latency", "print_table", "side_by_side", "throughput", "write_results"]

Call = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Stats:
    """Latency percentiles of one measured call, in milliseconds."""

    name: str
    calls: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float

    @classmethod
    def of(cls, name: str, samples_ns: np.ndarray[Any, Any]) -> Stats:
        ms = samples_ns / 1e6
        p50, p99, p999 = np.percentile(ms, [50, 99, 99.9])
        return cls(name, len(ms), float(p50), float(p99), float(p999), float(ms.mean()))


async def latency(name: str, call: Call, *, iterations: int, warmup: int = 200) -> Stats:
    """Time `iterations` sequential awaits of `call()` after `warmup` untimed ones."""
    for _ in range(warmup):
        await call()
    samples = np.empty(iterations, dtype=np.int64)
    clock = time.perf_counter_ns
    gc.collect()
    for i in range(iterations):
        start = clock()
        await call()
        samples[i] = clock() - start
    return Stats.of(name, samples)


async def throughput(call: Call, *, in_flight: int, duration_s: float = 3.0) -> float:
    """Calls per second with `in_flight` calls outstanding at all times."""
    done = 0
    stop_at = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done / (time.perf_counter() - start)


@dataclass(frozen=True)
class Side:
    """One mode of a side-by-side measurement: its latencies and, when a counter of Redis
    round trips was given (a relay's chunks_sent), how many calls made none."""

    stats: Stats
    no_trip_share: float | None = None  # calls during which the counter did not move
    no_trip: Stats | None = None  # the latencies of those calls
    trip: Stats | None = None  # and of the others


async def side_by_side(
    calls: dict[str, Callable[[T], Awaitable[Any]]],
    draw: Callable[[], T],
    *,
    iterations: int,
    block: int = 100,
    warmup_blocks: int = 2,
    trips: dict[str, Callable[[], int]] | None = None,
) -> dict[str, Side]:
    """The same requests to every mode (`calls[mode](request)`), sequential, in blocks of
    `block` drawn afresh by `draw()`, the modes' order reversed every other block: drift on
    the machine hits them all alike. `trips[mode]()` is read around each call: a call
    during which it did not move made no round trip to Redis.

    Example:
        sides = await side_by_side({"off": off.lookup, "on": on.lookup}, traffic.next, iterations=2000)
    """
    samples: dict[str, list[int]] = {mode: [] for mode in calls}
    crossed: dict[str, list[bool]] = {mode: [] for mode in calls}
    trips = trips or {}
    order = list(calls)
    clock = time.perf_counter_ns
    gc.collect()
    for b in range(-warmup_blocks, iterations // block):
        requests = [draw() for _ in range(block)]
        for mode in order if b % 2 else order[::-1]:
            call, counter, timed = calls[mode], trips.get(mode), b >= 0
            for request in requests:
                before = counter() if counter else 0
                start = clock()
                await call(request)
                elapsed = clock() - start
                if timed:
                    samples[mode].append(elapsed)
                    if counter:
                        crossed[mode].append(counter() != before)
    out = {}
    for mode, values in samples.items():
        ns = np.array(values, dtype=np.int64)
        side = Side(Stats.of(mode, ns))
        if mode in trips:
            went = np.array(crossed[mode])
            side = Side(
                side.stats,
                float(1 - went.mean()),
                Stats.of(f"{mode} no trip", ns[~went]) if (~went).any() else None,
                Stats.of(f"{mode} trip", ns[went]) if went.any() else None,
            )
        out[mode] = side
    return out


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print dicts as an aligned text table."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return str(value)


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write `results` with the run's context to benchmarks/results/<name>-<time>.json."""
    folder = Path(__file__).resolve().parent / "results"
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{name}-{stamp}.json"
    context = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    path.write_text(json.dumps({"context": context, **results}, indent=2, default=_json))
    return path


def _json(value: Any) -> Any:
    if isinstance(value, Stats | Side):
        return asdict(value)
    raise TypeError(type(value))


def run_on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on uvloop (the server's loop) when it is installed."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(main)

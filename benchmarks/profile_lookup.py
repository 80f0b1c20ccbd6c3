"""Where a lookup's server time goes: py-spy on the server under a sequential load.

    .venv/bin/pip install py-spy        # once: the sampling profiler, not a dependency of the package
    .venv/bin/python benchmarks/profile_lookup.py [--entities 1 100] [--seconds 15]

Starts an embedded Redis with bench_lookup's rows and `featurestore serve` (no cache, as
bench_lookup), then for each batch size runs sequential 50-feature lookups from this
process while `py-spy record --format raw` samples the server at `--rate` Hz. The
collapsed stacks are folded into a table per request: the microseconds each function
spends on the CPU inclusive of what it calls ("incl us") and in itself ("self us"),
i.e. samples / rate / requests. Only the thread holding the GIL is sampled (py-spy --gil;
`--all-threads` samples every thread py-spy thinks active, which on this VM includes
threads blocked in epoll), so the top frame's time is the server's GIL-holding time per
request: Python, and the C work (grpc's Cython layer, uvloop, numpy, hiredis) done
without releasing the GIL. What grpc's core does on its own thread without the GIL is
not in it. Writes benchmarks/results/profile-<time>.json and, with `--markdown`, the
tables as benchmarks/README.md shows them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_lookup import FEATURES, entities, populated_store, process, serve_command
from harness import run_on_uvloop, write_results

from featurestore import AsyncClient
from featurestore.embedded import free_port
from featurestore.registry import Registry

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `file.py:func` (lines merged)."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "featurestore/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{match['func']}"


def fold(raw: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Inclusive and self sample counts per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        total += count
        for name in set(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    return inclusive, own, total


async def load(target: str, registry: Registry, n: int, users: int, seconds: float) -> int:
    """Sequential lookups of `n` entities x 50 features for `seconds`; the number of calls."""
    rng = np.random.default_rng(n)
    batches = [entities(registry, n, users, rng) for _ in range(64)]
    calls = 0
    async with AsyncClient(target) as client:
        for ents in batches[:8]:
            await client.get_online_features(ents, FEATURES)
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            await client.get_online_features(batches[calls % 64], FEATURES)
            calls += 1
    return calls


def profile(
    pid: int, target: str, registry: Registry, n: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Sample the server `pid` while this thread sends sequential `n` x 50 lookups; the folded table."""
    out = workdir / f"spy-{n}.txt"
    spy = subprocess.Popen(
        [
            args.py_spy,
            "record",
            "--format",
            "raw",
            "--rate",
            str(args.rate),
            "--pid",
            str(pid),
            "--duration",
            str(int(args.seconds)),
            *(["--nonblocking"] if args.nonblocking else []),
            *(["--native"] if args.native else []),
            *([] if args.all_threads else ["--gil"]),
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy attaches
    calls = run_on_uvloop(load(target, registry, n, args.users, args.seconds - 1.5))
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0:
        raise SystemExit(f"py-spy failed: {err.decode().strip().splitlines()[-1:]}")
    inclusive, own, total = fold(out.read_text())
    per_call_us = 1e6 / args.rate / calls
    rows = [
        {"function": name, "incl_us": count * per_call_us, "self_us": own.get(name, 0) * per_call_us}
        for name, count in inclusive.most_common()
        if count * per_call_us >= args.min_us
    ]
    return {"entities": n, "calls": calls, "samples": total, "cpu_us_per_call": total * per_call_us, "rows": rows}


def markdown(result: dict[str, Any], top: int) -> str:
    """The table of one batch size: the frames under the event loop's own (whose inclusive
    time is all of it), by inclusive time; the loop's self time is gRPC's Cython layer,
    uvloop and the sockets."""
    total = result["cpu_us_per_call"]
    lines = [
        f"{result['entities']} x 50: {result['calls']:,} calls, {total:.0f} us of GIL-holding server time per call",
        "",
        "| function | incl us | self us |",
        "|---|---|---|",
    ]
    shown = 0
    for row in result["rows"]:
        if row["incl_us"] >= total - 0.5 and row["self_us"] < 0.5:
            continue  # the start-up chain down to the event loop: all of it, nothing of its own
        lines.append(f"| `{row['function']}` | {row['incl_us']:.0f} | {row['self_us']:.0f} |")
        shown += 1
        if shown == top:
            break
    return "\n".join(lines)


async def _serve_and_profile(args: argparse.Namespace) -> list[dict[str, Any]]:
    async with populated_store("profile", args.users) as (repo, registry, url):
        port = free_port()
        target = f"127.0.0.1:{port}"
        with process(serve_command(repo, url, port, *args.serve_args), port) as server:
            async with AsyncClient(target) as client:
                await client.wait_until_serving(60)
            with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
                loop = asyncio.get_running_loop()
                return [
                    await loop.run_in_executor(None, profile, server.pid, target, registry, n, args, Path(tmp))
                    for n in args.entities
                ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--entities", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--seconds", type=float, default=15.0, help="sampling time per batch size")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--min-us", type=float, default=5.0, help="leave out functions under this per call")
    parser.add_argument("--top", type=int, default=30, help="rows per table with --markdown")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--nonblocking", action="store_true", help="sample without pausing the server")
    parser.add_argument(
        "--all-threads", action="store_true", help="sample every active thread, not only the one holding the GIL"
    )
    parser.add_argument("--native", action="store_true", help="include C frames (grpc core, numpy, hiredis)")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `serve` flags")
    args = parser.parse_args()
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    results = run_on_uvloop(_serve_and_profile(args))
    for result in results:
        print(markdown(result, args.top) if args.markdown else result)
        print()
    print("wrote", write_results("profile", {"results": results}))


if __name__ == "__main__":
    main()

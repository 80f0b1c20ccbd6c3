"""Two servers side by side on one Redis: this checkout against another, or uvloop against asyncio.

    .venv/bin/python benchmarks/bench_side_by_side.py --other-checkout ../before   # code A/B
    .venv/bin/python benchmarks/bench_side_by_side.py --loop                       # event loops

Two `featurestore serve` processes on one embedded Redis (bench_lookup's rows and flags):
"this" (this checkout, as shipped: uvloop when installed) and either "other" (the same
command with another checkout first on PYTHONPATH, e.g. a `git worktree` of an older
commit) or "asyncio" (this checkout with uvloop hidden, so `run_worker` falls back to
asyncio's loop). Sequential 1 x 50 and 100 x 50 lookups through this checkout's
AsyncClient go to the two servers in alternating blocks of `--calls`, `--rounds` times,
so load from elsewhere on the machine hits both alike. Prints the median over blocks of
each block's p50; writes benchmarks/results/side-by-side-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_lookup import FEATURES, entities, populated_store, process, serve_command
from harness import run_on_uvloop, write_results

from featurestore import AsyncClient
from featurestore.embedded import free_port

# `python -c` with uvloop made unimportable, then the `featurestore` command's own main.
WITHOUT_UVLOOP = "import sys; sys.modules['uvloop'] = None; from featurestore.cli.main import main; sys.exit(main())"


async def _block(client: AsyncClient, ents: dict[str, Any], calls: int) -> float:
    samples = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter()
        await client.get_online_features(ents, FEATURES)
        samples[i] = time.perf_counter() - start
    return float(np.median(samples) * 1e3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    other = "asyncio" if args.loop else "other"
    async with populated_store("side-by-side", args.users) as (repo, registry, url):
        ports = {"this": free_port(), other: free_port()}
        this = serve_command(repo, url, ports["this"])
        if args.loop:
            second = [sys.executable, "-c", WITHOUT_UVLOOP, *serve_command(repo, url, ports[other])[3:]]
            env, cwd = None, None
        else:
            second = serve_command(repo, url, ports[other])
            env = {**os.environ, "PYTHONPATH": str(args.other_checkout.resolve())}
            cwd = args.other_checkout.resolve()  # `python -m` looks in the working folder first
        out: dict[str, Any] = {"other": "asyncio loop" if args.loop else str(args.other_checkout)}
        with process(this, ports["this"]), process(second, ports[other], env=env, cwd=cwd):
            clients = {name: AsyncClient(f"127.0.0.1:{port}") for name, port in ports.items()}
            for client in clients.values():
                await client.wait_until_serving(60)
            for n in args.entities:
                ents = entities(registry, n, args.users, np.random.default_rng(n))
                for client in clients.values():
                    await _block(client, ents, 100)  # warm-up
                blocks: dict[str, list[float]] = {name: [] for name in clients}
                for _ in range(args.rounds):
                    for name, client in clients.items():
                        blocks[name].append(await _block(client, ents, args.calls))
                medians = {name: float(np.median(p50s)) for name, p50s in blocks.items()}
                out[f"{n}x50"] = {"blocks_p50_ms": blocks, "median_p50_ms": medians}
                print(
                    f"{n} x 50: p50 this {medians['this']:.3f} ms, {other} {medians[other]:.3f} ms"
                    f" ({other} / this {medians[other] / medians['this']:.2f})"
                )
            for client in clients.values():
                await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--entities", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=800, help="sequential calls per block")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--other-checkout", type=Path, help="a checkout (e.g. a git worktree) to serve the other side")
    which.add_argument("--loop", action="store_true", help="the other side: this checkout on asyncio's loop")
    args = parser.parse_args()
    results = run_on_uvloop(run(args))
    print("wrote", write_results("side-by-side", {"results": results}))


if __name__ == "__main__":
    main()

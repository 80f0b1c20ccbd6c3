"""The server on uvloop (its default) against asyncio's own loop: lookups side by side.

    .venv/bin/python benchmarks/bench_event_loop.py [--rounds 6] [--calls 800]

Two `featurestore serve` processes on one embedded Redis (bench_lookup's rows and flags):
one as shipped (uvloop when installed), one started with uvloop hidden, so `run_worker`
falls back to asyncio's loop. Sequential 1 x 50 and 100 x 50 lookups through the
AsyncClient go to the two servers in alternating blocks of `--calls`, `--rounds` times,
so load from elsewhere on the machine hits both alike. Prints the p50 of each block and
the median over blocks; writes benchmarks/results/event-loop-<time>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
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
    async with populated_store("loop", args.users) as (repo, registry, url):
        ports = {"uvloop": free_port(), "asyncio": free_port()}
        shipped = serve_command(repo, url, ports["uvloop"])
        plain = [sys.executable, "-c", WITHOUT_UVLOOP, *serve_command(repo, url, ports["asyncio"])[3:]]
        out: dict[str, Any] = {}
        with process(shipped, ports["uvloop"]), process(plain, ports["asyncio"]):
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
                    f"{n} x 50: p50 uvloop {medians['uvloop']:.3f} ms, asyncio {medians['asyncio']:.3f} ms"
                    f" (asyncio / uvloop {medians['asyncio'] / medians['uvloop']:.2f})"
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
    args = parser.parse_args()
    results = run_on_uvloop(run(args))
    print("wrote", write_results("event-loop", {"results": results}))


if __name__ == "__main__":
    main()

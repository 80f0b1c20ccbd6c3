"""bench_feast.py's report: ratios, targets, JSON, the Markdown summary and the plots.

`assemble` turns the raw measurements into one results dict (ratios and targets computed
from figures of the same run); `write` stores it as <out>/feast-<time>.json, the summary
as <out>/feast-latest.md and, when matplotlib is installed, <out>/feast-latency.png and
<out>/feast-throughput.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

CASES = ("1x50", "100x50", "100x50+emb")
SYSTEMS = {
    "ours": "ours (gRPC)",
    "feast_sdk": "Feast SDK",
    "feast_server": "Feast server",
    "floor": "floor (echo + MGET)",
}
PERCENTILES = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def _floor(echo: dict[str, Any], mget: dict[str, Any]) -> dict[str, Any]:
    e, m = echo["latency"], mget["latency"]
    return {
        "latency": {key: e[key] + m[key] for key, _ in PERCENTILES},
        "throughput": echo["throughput"],  # the gRPC echo alone: Redis is not the limit
        "calls": e["calls"],
    }


def _lookup(measured: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for case in CASES:
        grpc = measured["grpc"][case]
        out[case] = {
            "ours": grpc["ours"],
            "feast_sdk": measured["sdk"][case]["feast"],
            "feast_server": measured["http"][case]["feast"],
            "echo": grpc["echo"],
            "mget": grpc["mget"],
            "floor": _floor(grpc["echo"], grpc["mget"]),
            "request_bytes": grpc["request_bytes"],
            "response_bytes": grpc["response_bytes"],
            "redis_keys": grpc["redis_keys"],
        }
    return out


def _ratios(lookup: dict[str, Any]) -> dict[str, Any]:
    """Feast / ours for latency (higher is better for us), ours / Feast for calls/s."""
    out: dict[str, Any] = {}
    for case, r in lookup.items():
        ours = r["ours"]
        row: dict[str, Any] = {}
        for other in ("feast_sdk", "feast_server"):
            for key, label in PERCENTILES:
                row[f"{other}_over_ours_{label}"] = r[other]["latency"][key] / ours["latency"][key]
            row[f"ours_over_{other}_calls_per_s"] = {
                k: ours["throughput"][k] / v for k, v in r[other]["throughput"].items()
            }
        for key, label in PERCENTILES:
            row[f"ours_over_floor_{label}"] = ours["latency"][key] / r["floor"]["latency"][key]
        row["ours_over_floor_calls_per_s"] = {k: ours["throughput"][k] / v for k, v in r["floor"]["throughput"].items()}
        out[case] = row
    return out


def _target(name: str, measured: float, goal: float, higher: bool = True) -> dict[str, Any]:
    """`higher`: the target is met at or above `goal` (else at or below it)."""
    met = measured >= goal if higher else measured <= goal
    return {"target": name, "goal": goal, "measured": measured, "met": bool(met)}


def _targets(ratios: dict[str, Any], mat: dict[str, Any]) -> list[dict[str, Any]]:
    r100, r1 = ratios["100x50"], ratios["1x50"]
    at32 = r100["ours_over_feast_server_calls_per_s"].get("32")
    targets = [
        _target("100x50 p99: Feast server / ours >= 50", r100["feast_server_over_ours_p99"], 50),
        _target("100x50 p99: Feast SDK / ours >= 30", r100["feast_sdk_over_ours_p99"], 30),
        _target("1x50 p99: Feast server / ours >= 4", r1["feast_server_over_ours_p99"], 4),
        _target("1x50 p50: Feast server / ours >= 4", r1["feast_server_over_ours_p50"], 4),
    ]
    if at32 is not None:
        targets.append(_target("100x50 calls/s at 32 in flight: ours / Feast server >= 30", at32, 30))
    ours, feast = mat["ours"], mat["feast"]
    targets.append(
        _target("materialize rows/s, wall time: ours / Feast >= 40", ours["rows_per_s"] / feast["rows_per_s"], 40)
    )
    net = "rows_per_s_net_of_fixed_cost"
    if ours[net] and feast[net]:
        targets.append(
            _target("materialize rows/s net of the no-op rerun: ours / Feast >= 40", ours[net] / feast[net], 40)
        )
    if ours.get("rows_per_s_in_job") and feast[net]:
        targets.append(
            _target(
                "materialize rows/s, ours in-job / Feast net of no-op >= 40", ours["rows_per_s_in_job"] / feast[net], 40
            )
        )
    memory = ours["peak_rss_mb"] / feast["peak_rss_mb"]
    targets.append(_target("materialize peak RSS: ours / Feast <= 0.1", memory, 0.1, False))
    for case in CASES:
        ratio = ratios[case]["ours_over_floor_p50"]
        targets.append(_target(f"{case} p50: ours / floor <= 1.3", ratio, 1.3, False))
    return targets


def _in_job(mat: dict[str, Any]) -> None:
    """Our job's own rate, from its summary line (after start-up and registry loading)."""
    found = re.search(r"read (\d+) rows.* in ([\d.]+) s", mat.get("ours_summary", ""))
    if found and float(found[2]) > 0:
        mat["ours"]["in_job_s"] = float(found[2])
        mat["ours"]["rows_per_s_in_job"] = int(found[1]) / float(found[2])


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute ratios and targets from the lookups and materialization of `results`."""
    _in_job(results["materialize"])
    results["ratios"] = _ratios(results["lookup"])
    results["targets"] = _targets(results["ratios"], results["materialize"])
    return results


def assemble(
    args: argparse.Namespace, machine: dict[str, Any], mat: dict[str, Any], measured: dict[str, Any]
) -> dict[str, Any]:
    """One results dict: context, config, materialization, lookups, ratios, targets."""
    return derive(
        {
            "context": {"command": args.command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")},
            "machine": machine,
            "config": {
                "users": args.users,
                "items": args.items,
                "quick": args.quick,
                "server_workers": args.workers,
                "iterations_ours": args.iterations,
                "iterations_feast_1_row": args.iterations,
                "iterations_feast_100_rows": args.feast_iterations,
                "warmup": args.warmup,
                "in_flight": args.in_flight,
                "throughput_duration_s": args.duration_s,
                "redis": "one embedded redis-server: ours in db 0, Feast's in db 1",
            },
            "materialize": mat,
            "lookup": _lookup(measured),
            "variants": measured["variants"],
        }
    )


def write(results: dict[str, Any], out: Path, path: Path | None = None) -> Path:
    """JSON, Markdown and plots into `out`; returns the JSON's path (new unless given)."""
    out.mkdir(parents=True, exist_ok=True)
    path = path or out / f"feast-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    plots = _plots(results, out)
    (out / "feast-latest.md").write_text(markdown(results, path.name, plots))
    return path


# -- Markdown ------------------------------------------------------------------------------


def _n(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results: dict[str, Any], json_name: str, plots: list[str]) -> str:
    """The summary: machine, config, latency, throughput, ratios, targets, variants."""
    m, c = results["machine"], results["config"]
    dirty = " (with uncommitted changes)" if m["git_commit"].endswith("dirty") else ""
    lines = [
        "# Ours vs Feast 0.67, same machine, same run",
        "",
        f"{results['context']['date']}; `{results['context']['command']}`; {json_name}.",
        f"Machine: {m['nproc']} CPUs, {m['memory_gb']} GB, Python {m['python']}, feast "
        f"{m['feast']}, grpcio {m['grpcio']}, redis-py {m['redis_py']}, commit "
        f"{m['git_commit'][:12]}{dirty}; load"
        f" average {m['load_average_at_start'][0]:.2f} at start,"
        f" {m.get('load_average_at_end', [float('nan')])[0]:.2f} at end.",
        f"Data: {c['users']:,} users, {c['items']:,} items. Both servers: "
        f"{c['server_workers']} worker process(es). Sequential calls: ours and floors "
        f"{c['iterations_ours']} (after {c['warmup']} warm-up), Feast {c['iterations_feast_1_row']}"
        f" for 1 row and {c['iterations_feast_100_rows']} for 100 rows (p99.9 of so few calls is"
        f" close to their maximum). Throughput: closed loop, {c['throughput_duration_s']} s per"
        f" point. {c['redis']}.",
        "",
        "## Latency (ms, sequential)",
        "",
    ]
    rows = []
    for case, r in results["lookup"].items():
        for key, label in SYSTEMS.items():
            lat = r[key]["latency"]
            rows.append([case, label, *(_n(lat[p]) for p, _ in PERCENTILES)])
    lines += _table(["lookup", "system", "p50", "p99", "p99.9"], rows)
    lines += ["", "## Throughput (calls/s, closed loop)", ""]
    ks = [str(k) for k in c["in_flight"]]
    rows = []
    for case, r in results["lookup"].items():
        for key, label in SYSTEMS.items():
            rows.append([case, label, *(_n(r[key]["throughput"].get(k, 0.0)) for k in ks)])
    lines += _table(["lookup", "system", *(f"{k} in flight" for k in ks)], rows)
    lines += ["", "## Ratios (same run)", ""]
    rows = []
    feast = ("feast_sdk", "feast_server")
    for case, x in results["ratios"].items():
        latency = [f"{x[f'{o}_over_ours_{p}']:.1f}x" for o in feast for p in ("p50", "p99")]
        at32 = [x[f"ours_over_{o}_calls_per_s"].get("32") for o in feast]
        rates = [f"{r:.1f}x" if r is not None else "-" for r in at32]
        floor = [f"{x['ours_over_floor_p50']:.2f}", f"{x['ours_over_floor_p99']:.2f}"]
        rows.append([case, *latency, *rates, *floor])
    lines += _table(
        [
            "lookup",
            "SDK/ours p50",
            "SDK/ours p99",
            "server/ours p50",
            "server/ours p99",
            "ours/SDK calls/s @32",
            "ours/server calls/s @32",
            "ours/floor p50",
            "ours/floor p99",
        ],
        rows,
    )
    lines += ["", "## Materialization", ""]
    rows = []
    for key, label in (
        ("feast", "Feast `feast materialize-incremental`"),
        ("ours", "ours `featurestore-materialize incremental`"),
    ):
        j = results["materialize"][key]
        rows.append(
            [
                label,
                f"{j['rows']:,}",
                _n(j["wall_s"]),
                _n(j["rows_per_s"]),
                _n(j["noop_rerun_wall_s"]),
                _n(j["rows_per_s_net_of_fixed_cost"]),
                _n(j.get("rows_per_s_in_job")),
                _n(j["peak_rss_mb"]),
            ]
        )
    lines += _table(
        [
            "job",
            "rows",
            "wall s",
            "rows/s (wall)",
            "no-op rerun s",
            "rows/s net of no-op",
            "rows/s in job",
            "peak RSS MB",
        ],
        rows,
    )
    lines += [
        "",
        "rows/s net of no-op: rows / (wall of the load - wall of a rerun that finds",
        "nothing new); '-' when that difference is under 10% of the wall time (noise).",
        "rows/s in job: our job's own summary line (after imports and registry loading);",
        "Feast prints no such figure.",
    ]
    lines += ["", "## Targets", ""]
    lines += _table(
        ["target", "measured", "met"],
        [[t["target"], f"{t['measured']:.2f}", "yes" if t["met"] else "**no**"] for t in results["targets"]],
    )
    lines += ["", "## Feast variants tried", "", *_variants(results)]
    lines += ["", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(lines)


def _variants(results: dict[str, Any]) -> list[str]:
    v = results["variants"]
    rows = []
    for name, r in v["sdk"].items():
        lat = r["feast"]["latency"]
        rows.append([f"SDK {name}", *(_n(lat[p]) for p, _ in PERCENTILES), ""])
    base = results["lookup"]["100x50"]["feast_sdk"]["latency"]
    rows.append(["SDK 100x50 (baseline, collector untouched)", *(_n(base[p]) for p, _ in PERCENTILES), ""])
    workers = v["http_workers"]["workers"]
    for case in ("1x50", "100x50"):
        for label, r in (
            (f"server {workers} workers", v["http_workers"][case]["feast"]),
            (
                f"server {results['config']['server_workers']} worker(s), baseline",
                results["lookup"][case]["feast_server"],
            ),
        ):
            lat, tp = r["latency"], r["throughput"]
            rates = ", ".join(f"{k}: {_n(x)}" for k, x in tp.items())
            rows.append([f"{label} {case}", *(_n(lat[p]) for p, _ in PERCENTILES), rates])
    return _table(["variant", "p50 ms", "p99 ms", "p99.9 ms", "calls/s by in flight"], rows)


# -- plots -----------------------------------------------------------------------------------


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    lookup = results["lookup"]
    fig, axes = plt.subplots(1, len(CASES), figsize=(14, 4.5), sharey=True)
    width = 0.2
    for ax, case in zip(axes, CASES, strict=True):
        for i, (key, label) in enumerate(SYSTEMS.items()):
            values = [lookup[case][key]["latency"][p] for p, _ in PERCENTILES]
            ax.bar([x + i * width for x in range(3)], values, width, label=label)
        ax.set_xticks([x + 1.5 * width for x in range(3)], [p for _, p in PERCENTILES])
        ax.set_yscale("log")
        ax.set_title(f"{case} features")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("latency, ms (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Sequential lookup latency: ours vs Feast vs floor")
    fig.tight_layout()
    fig.savefig(out / "feast-latency.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(CASES), figsize=(14, 4.5), sharey=True)
    for ax, case in zip(axes, CASES, strict=True):
        for key, label in SYSTEMS.items():
            tp = lookup[case][key]["throughput"]
            ax.plot([int(k) for k in tp], list(tp.values()), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("calls in flight")
        ax.set_title(f"{case} features")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("calls/s (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Closed-loop throughput by concurrency: ours vs Feast vs floor")
    fig.tight_layout()
    fig.savefig(out / "feast-throughput.png", dpi=110)
    plt.close(fig)
    return ["feast-latency.png", "feast-throughput.png"]

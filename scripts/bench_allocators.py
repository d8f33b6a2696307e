"""Speed and peak RSS of one CPU training run under different C allocator settings.

glibc's default allocator is the fastest here but keeps freed memory resident (peak RSS several
times the live memory); pinning its thresholds (`--low-cpu-memory`) gives the live peak at a
cost in page faults. This script measures that trade and the alternatives, so that the choice
in qorpo.sysmem / qorpo.memory.plan can be rechecked on any machine:

    python scripts/bench_allocators.py                      # every variant, dpo512 preset
    python scripts/bench_allocators.py --variants default,pinned,jemalloc --repeats 2

Each variant trains the `scripts/bench_speed.py` preset (packed layout, SmolLM2-135M 4-bit,
two epochs over the same pairs, the second one timed) in its own process; variants alternate
when --repeats > 1. glibc settings go in through GLIBC_TUNABLES (read at process start),
jemalloc through LD_PRELOAD (skipped where libjemalloc.so.2 is missing). Prints a table and,
last, one JSON line (s/step, peak RSS, time ratio to the default measured in the same run).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed  # noqa: E402  (a sibling script: its presets, data and timed child)

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
PINNED = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"
# name: (environment of the child, qorpo.train options, malloc_trim(0) after every step)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any], bool]] = {
    "default": ({}, {}, False),
    "pinned": ({}, {"low_cpu_memory": True}, False),  # qorpo.sysmem, as --low-cpu-memory
    "pinned-thp": ({"THP_MEM_ALLOC_ENABLE": "1"}, {"low_cpu_memory": True}, False),
    "pinned-hugetlb": ({"GLIBC_TUNABLES": PINNED + ":glibc.malloc.hugetlb=1"}, {}, False),
    "fixed-4mib": ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4194304:"
                    "glibc.malloc.trim_threshold=131072"}, {}, False),
    "trim-each-step": ({}, {}, True),
    "one-arena": ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, {}, False),
    "jemalloc": ({"LD_PRELOAD": JEMALLOC}, {}, False),
}


def child(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    _, flags, trim = VARIANTS[name]
    spec = {**spec, "low_cpu_memory": bool(flags.get("low_cpu_memory"))}  # never qorpo's choice
    bench_speed.FLAGS["packed"] = {k: v for k, v in flags.items() if k != "low_cpu_memory"}
    if trim:
        libc = ctypes.CDLL("libc.so.6")
        step_end = bench_speed.EpochTimer.on_step_end

        def on_step_end(self: Any, *args: Any, **kwargs: Any) -> None:
            libc.malloc_trim(0)  # give back every free page of every arena
            step_end(self, *args, **kwargs)

        bench_speed.EpochTimer.on_step_end = on_step_end  # type: ignore[method-assign]
    return bench_speed.child("packed", spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(bench_speed.PRESETS), default="dpo512")
    parser.add_argument("--data", type=Path, default=bench_speed.SHARED)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.spec))), flush=True)
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if "jemalloc" in names and not Path(JEMALLOC).exists():
        print(f"{JEMALLOC} not found: the jemalloc row is skipped (apt install libjemalloc2)")
        names.remove("jemalloc")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    with tempfile.TemporaryDirectory(prefix="qorpo-bench-alloc-") as tmp:
        ns = argparse.Namespace(preset=args.preset, pairs=0, batch=0, device="cpu", model=None,
                                data=args.data, threads=args.threads, low_cpu_memory=False)
        spec = bench_speed.prepare(ns, Path(tmp))
        for rep in range(args.repeats):
            for name in names:
                res = bench_speed.run_child(name, spec, script=__file__, env=VARIANTS[name][0])
                if res is None:
                    continue
                runs[name].append(res)
                print(f"  run {rep + 1} {name}: {res['seconds'] / res['steps']:.2f} s/step, "
                      f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    best = {v: min(r["seconds"] / r["steps"] for r in rs) for v, rs in runs.items() if rs}
    rows = [{"variant": v, "s_per_step": round(best[v], 3),
             "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)),
             "time_vs_default": (round(best[v] / best["default"], 3)
                                 if "default" in best else None)}
            for v, rs in runs.items() if rs]
    print("\n| variant | s/step | peak RSS MB | time vs default |\n|---|---|---|---|")
    for r in rows:
        ratio = "—" if r["time_vs_default"] is None else f"{r['time_vs_default']:.2f}x"
        print(f"| {r['variant']} | {r['s_per_step']} | {r['peak_rss_mb']} | {ratio} |")
    print(json.dumps({"preset": args.preset, "threads": args.threads, "repeats": args.repeats,
                      "rows": rows}))


if __name__ == "__main__":
    main()

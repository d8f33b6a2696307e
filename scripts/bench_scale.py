"""Data-parallel scaling: 1 process vs N processes (torchrun) at the same global batch.

1 process trains with --grad-accum N*k, N processes with --grad-accum k each: the same pairs in
the same optimizer steps (tests/test_distributed.py checks that the adapters are equal). Each
process gets --threads threads (default 1 on this CPU, so 2 processes use the 2 cores that 1
process would leave half idle). Steps are timed from the run's metrics.jsonl: seconds between
the log of the first and the last step (the first step warms up), and tokens/s as qorpo logs it
(unique tokens of the pairs, summed over processes).

    python scripts/bench_scale.py                         # demo model + demo data, 2 processes
    python scripts/bench_scale.py --procs 2 --steps 6 --batch 4
    python scripts/bench_scale.py --device cuda           # all GPUs of the machine (NCCL)
    python scripts/bench_scale.py --device cuda --fsdp    # the same through FSDP + QLoRA

Prints a table (s/step, tokens/s, speed-up, scaling efficiency = speed-up / N) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run(procs: int, args: argparse.Namespace, model: str, data: str, out: Path) -> dict[str, Any]:
    accum = args.accum * (args.procs // procs)  # same global batch for every process count
    train = ["train", "--model", model, "--data", data, "--output-dir", str(out),
             "--overwrite", "--max-steps", str(args.steps), "--batch-size", str(args.batch),
             "--grad-accum", str(accum), "--logging-steps", "1", "--save-steps", "100000",
             "--max-length", str(args.max_length), "--warmup-ratio", "0",
             "--no-group-by-length"]
    if args.fsdp:  # accelerate's FSDP needs an accelerator: the GPU check of FSDP + QLoRA
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples" / "accelerate" / "fsdp_qlora.yaml"), "--num_processes",
               str(procs), "-m", "qorpo", *train, "--dtype", "bf16"]
    elif procs == 1:
        cmd = [sys.executable, "-m", "qorpo", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), "-m", "qorpo", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    timed = steps[1:]  # the first step warms up
    seconds = steps[-1]["time"] - steps[0]["time"]
    return {"processes": procs, "grad_accum": accum, "s_per_step": seconds / len(timed),
            "tokens_per_s": sum(r["tokens_per_second"] for r in timed) / len(timed),
            "pairs_per_step": args.batch * accum * procs, "steps_timed": len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--accum", type=int, default=1, help="accumulation with --procs")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--model", help="model folder (default: the offline demo model)")
    parser.add_argument("--data", help="preference file (default: the demo data)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--fsdp", action="store_true",
                        help="(CUDA) shard the 4-bit model (examples/accelerate/...)")
    args = parser.parse_args()
    if args.fsdp and args.device != "cuda":
        raise SystemExit("--fsdp needs --device cuda: accelerate's FSDP needs an accelerator")
    if args.device == "cuda":
        import torch

        args.procs = max(torch.cuda.device_count(), 1)
        args.threads = max(args.threads, 4)
    from qorpo.demo import demo_data_files, ensure_demo_model

    model = args.model or str(ensure_demo_model())
    data = args.data or str(demo_data_files().train)
    with tempfile.TemporaryDirectory(prefix="qorpo-bench-scale-") as tmp:
        rows = [run(n, args, model, data, Path(tmp) / f"p{n}") for n in (1, args.procs)]
    base = rows[0]
    for r in rows:
        r["speedup"] = base["s_per_step"] / r["s_per_step"]
        r["efficiency"] = r["speedup"] / r["processes"]
    head = ("processes", "grad accum", "pairs/step", "s/step", "tokens/s", "speed-up",
            "efficiency")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['processes']} | {r['grad_accum']} | {r['pairs_per_step']} | "
              f"{r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
              f"{r['efficiency']:.0%} |")
    print(json.dumps({"device": args.device, "threads_per_process": args.threads,
                      "max_length": args.max_length, "rows": rows}))


if __name__ == "__main__":
    main()

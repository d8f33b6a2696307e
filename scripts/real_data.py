"""The real-data result in docs/eval.md, reproduced by one command on a CPU:

    OMP_NUM_THREADS=2 python scripts/real_data.py --data ../shared/data/dpo_en_demo.json

SmolLM2-135M-Instruct (the offline demo's model) trained with ORPO on LLaMA-Factory's
dpo_en_demo.json, a tenth held out by --eval-fraction; then `qorpo eval` scores the held-out
pairs with the base and the tuned adapter, and `qorpo plot` draws the curves. Writes OUT/run
(the run), OUT/eval.json, OUT/curves.png and OUT/result.json (settings, wall time and peak
memory of each phase). A finished run in OUT/run is reused (rerun only eval and plot).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Why these: on a 2-core CPU a pair of ~1,000 tokens (prompt once + both responses, 512 each)
# takes seconds to score and ~3x that to train, so a budget of minutes buys only a few dozen
# pairs: 8 steps of 4, at a high rate to move at all — the offline demo's 5e-4, which takes its
# own eval set from 0.175 to 1.0 in 12 steps; β stays at the paper's 0.1.
SETTINGS = {"eval_fraction": 0.1, "max_length": 512, "max_steps": 8, "batch_size": 2,
            "grad_accum": 2, "learning_rate": 5e-4, "beta": 0.1, "seed": 42}


def train(model: Path, data: Path, run: Path, settings: dict[str, float]) -> dict[str, float]:
    """`qorpo train` in a child process: its wall time and peak RSS (wait4's rusage)."""
    cmd = [sys.executable, "-m", "qorpo", "train", "--model", str(model), "--data", str(data),
           "--output-dir", str(run), "--logging-steps", "1", "--save-steps", "1000",
           "--no-gradient-checkpointing",  # 135M parameters: recomputing would only cost time
           "--overwrite"]  # (an unfinished run of this script: a finished one is reused)
    for key, value in settings.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"qorpo train failed (exit {os.waitstatus_to_exitcode(status)})")
    return {"wall_s": time.perf_counter() - start, "peak_rss_gib": usage.ru_maxrss / 2**20}


def finished(run: Path) -> bool:
    try:
        return bool(json.loads((run / "qorpo_run.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dpo_en_demo.json"))
    parser.add_argument("--out", type=Path, default=Path("outputs/real-data"))
    parser.add_argument("--generate", type=int, default=2, help="greedy replies shown")
    for key, value in SETTINGS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file (the shared data folder is not part of qorpo)")
    from rich.console import Console

    from qorpo.demo import ensure_demo_model
    from qorpo.evaluation import eval_table, evaluate, generations_table
    from qorpo.plot import write_curves

    console = Console(width=140)
    settings = {k: getattr(args, k) for k in SETTINGS}
    model, run = ensure_demo_model(console=console), args.out / "run"
    saved = args.out / "train_phase.json"  # kept for a rerun of eval and plot alone
    phases = {}
    if not finished(run):
        phases["train"] = train(model, args.data, run, settings)
        saved.write_text(json.dumps(phases["train"]) + "\n")
    elif saved.is_file():
        phases["train"] = json.loads(saved.read_text())
    start = time.perf_counter()
    result = evaluate(str(run), generate=args.generate, max_new_tokens=48, console=console)
    phases["eval"] = {"wall_s": time.perf_counter() - start,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    console.print(eval_table(result))
    if result.generations:
        console.print(generations_table(result, width=200))
    (args.out / "eval.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    curves = write_curves([run], args.out / "curves.png", force=True)
    summary = {"settings": settings, "data": str(args.data), "phases": phases,
               "pairs": result.pairs, "dropped": result.dropped,
               "models": {m["name"]: m["metrics"] for m in result.models}, "curves": str(curves)}
    (args.out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    console.print_json(json.dumps({"phases": phases, "curves": str(curves)}))


if __name__ == "__main__":
    main()

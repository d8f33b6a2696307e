"""Memory estimate vs measurement: real training steps, one child process per row.

Every row trains 2 optimizer steps through `qorpo.train` (4-bit NF4 base, LoRA r=16 on every
linear layer, gradient checkpointing, the chunked loss, the default layout: prefix sharing +
packing) on pairs whose chosen and rejected sequences both reach `max_length`, and compares:

* the estimate qorpo itself prints for that run (`qorpo train --dry-run` shows the same:
  qorpo.memory.plan from the model's config.json and the data's real lengths), with
* the measurement: the child's peak RSS (VmHWM) on CPU; torch.cuda.max_memory_allocated on CUDA
  (against the estimate's `allocated`).

On CPU rows run with --low-cpu-memory by default (`--malloc pinned`): the estimate is the peak
there (goal: within 15%). `--malloc default` runs glibc's default allocator, which keeps freed
memory resident: its peak is checked against the range qorpo prints for it, from the estimate
to qorpo.memory.plan.allocator_bound (see docs/memory.md).

    python scripts/bench_memory.py                 # CPU: 2 models x 4 lengths x 1/2 pairs
    python scripts/bench_memory.py --quick         # 2 rows
    python scripts/bench_memory.py --malloc default
    python scripts/bench_memory.py --models llama-360m-shape --lengths 1024,2048
    python scripts/bench_memory.py --device cuda   # the rows a GPU run must fill (8B shape)

Models: `smollm2-135m` (the offline demo model, SmolLM2-135M-Instruct) and random-init Llama
models of a real model's shape built here from a config (no download), saved in bf16 with the
demo model's tokenizer. Prints a table and, last, one JSON line. The row design, the exact-
length data and the measurements of docs/memory.md come from this script's first version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
SHAPES = {  # name: (hidden, layers, intermediate, heads, kv heads, vocab, tied)
    "llama-360m-shape": (960, 32, 2560, 15, 5, 49152, True),  # SmolLM2-360M's config
    "llama-3.1-8b-shape": (4096, 32, 14336, 32, 8, 128256, False),  # GPU only
}
CPU_ROWS = [(m, t, p) for m in ("smollm2-135m", "llama-360m-shape")
            for t in (256, 512, 1024, 2048) for p in (1, 2)]
QUICK_ROWS = [("smollm2-135m", 256, 1), ("smollm2-135m", 512, 2)]
CUDA_ROWS = [("llama-3.1-8b-shape", 2048, 1), ("llama-3.1-8b-shape", 2048, 2),
             ("llama-3.1-8b-shape", 1024, 2)]
FILLER = ("the model reads every token of this filler so that each response is long enough "
          "to be cut exactly at the maximum length by the data pipeline").split()


def model_dir(name: str, cache: Path, device: str) -> Path:
    from qorpo.demo import ensure_demo_model

    demo = Path(ensure_demo_model())
    if name == "smollm2-135m":
        return demo
    out = cache / name
    if not (out / ".bench-complete").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        h, layers, i, heads, kv, vocab, tied = SHAPES[name]
        tok = AutoTokenizer.from_pretrained(demo)
        cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=i,
                          num_attention_heads=heads, num_key_value_heads=kv,
                          vocab_size=vocab, tie_word_embeddings=tied,
                          max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / ".bench-complete").write_text(name)
    return out


def make_data(path: Path, max_length: int, pairs: int) -> None:
    """Pairs whose chosen and rejected sequences both reach max_length exactly (qorpo's
    truncation cuts the filler), prompts of about max_length / 4 words."""
    rng = random.Random(max_length)

    def words(n: int) -> str:
        return " ".join(rng.choice(FILLER) for _ in range(n))

    with path.open("w") as f:
        for k in range(max(4, 2 * pairs)):
            f.write(json.dumps({"prompt": f"Question {k}: " + words(max_length // 5),
                                "chosen": f"Answer {k}: " + words(max_length),
                                "rejected": f"Other {k}: " + words(max_length)}) + "\n")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """(Child) 2 real steps; the estimate this run printed, and the measured peak."""
    import torch
    from rich.console import Console

    from qorpo.api import train

    torch.set_num_threads(spec["threads"])
    res = train(model=spec["model"], data=spec["data"], output_dir=spec["out"], overwrite=True,
                max_length=spec["max_length"], batch_size=spec["pairs"], grad_accum=1,
                max_steps=2, save_steps=10**6, logging_steps=1, min_response_tokens=1,
                low_cpu_memory=spec["pinned"], console=Console(quiet=True))
    est = res.memory.peak
    device = res.memory.device
    bound = res.memory.default_bound if not res.memory.low_cpu_memory else None
    return {"measured_gib": res.metrics["peak_memory_gib"],
            "estimate_gib": (est.allocated if device == "cuda" else est.total) / GIB,
            "bound_gib": None if bound is None else bound / GIB,
            "components_gib": est.gib(), "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", help="only these models (comma separated)")
    parser.add_argument("--lengths", help="only these max_lengths (comma separated)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qorpo" / "bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    rows = CUDA_ROWS if args.device == "cuda" else (QUICK_ROWS if args.quick else CPU_ROWS)
    if args.models:
        rows = [r for r in rows if r[0] in args.models.split(",")]
    if args.lengths:
        rows = [r for r in rows if str(r[1]) in args.lengths.split(",")]
    records = []
    with tempfile.TemporaryDirectory(prefix="qorpo-bench-memory-") as tmp:
        for name, length, pairs in rows:
            data = Path(tmp) / f"data-{length}-{pairs}.jsonl"
            make_data(data, length, pairs)
            spec = {"model": str(model_dir(name, args.cache, args.device)), "data": str(data),
                    "out": str(Path(tmp) / "out"), "max_length": length, "pairs": pairs,
                    "pinned": args.malloc == "pinned", "threads": args.threads}
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": str(ROOT)}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{name} {length}x{pairs}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            r.update(model=name, max_length=length, pairs=pairs,
                     error=r["estimate_gib"] / r["measured_gib"] - 1)
            if r["bound_gib"] is not None:  # glibc's default: within [estimate - 15%, bound]?
                r["in_range"] = (r["estimate_gib"] * 0.85 <= r["measured_gib"]
                                 <= r["bound_gib"])
            records.append(r)
            print(f"  {name} {length} x {pairs}: estimate {r['estimate_gib']:.2f} GiB, "
                  f"measured {r['measured_gib']:.2f} GiB ({r['error']:+.1%})", flush=True)
    default = args.device == "cpu" and args.malloc == "default"
    what = "max_memory_allocated" if args.device == "cuda" else f"peak RSS, malloc {args.malloc}"
    extra = (" bound GiB | measured / bound | in range |", "---|---|---|") if default else ("", "")
    print(f"\n| model | max_length | pairs | estimate GiB | measured GiB ({what}) | error |"
          f"{extra[0]}")
    print("|---|---|---|---|---|---|" + extra[1])
    for r in records:
        tail = (f" {r['bound_gib']:.2f} | {r['measured_gib'] / r['bound_gib']:.2f} | "
                f"{'yes' if r['in_range'] else 'NO'} |") if default else ""
        print(f"| {r['model']} | {r['max_length']} | {r['pairs']} | {r['estimate_gib']:.2f} | "
              f"{r['measured_gib']:.2f} | {r['error']:+.1%} |{tail}")
    worst = max((abs(r["error"]) for r in records), default=None)
    keys = ("model", "max_length", "pairs", "estimate_gib", "measured_gib", "error")
    summary: dict[str, Any] = {"device": args.device, "malloc": args.malloc, "rows": [
        {k: r[k] for k in keys + (("bound_gib", "in_range") if default else ())}
        for r in records], "worst_abs_error": worst}
    if default:  # the goal: every peak inside the range qorpo prints
        summary["goal_met"] = bool(records) and all(r["in_range"] for r in records)
    else:
        summary["goal_met"] = worst is not None and worst <= 0.15
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

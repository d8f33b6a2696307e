"""Training speed of qorpo's batch layouts (padded, prefix-shared, shared+packed) and of TRL's
ORPOTrainer, on the same model and the same pairs.

Every variant runs in its own child process (variants alternate when --repeats > 1), trains two
epochs over the same pairs, and is timed on the second epoch only (the first one warms up
allocators, kernels and lazy initialisation), so each timed epoch covers exactly the same pairs
whatever order a trainer draws them in. Reported per variant: s/step, pairs/s, tokens/s
(*unique* tokens of the pairs: each prompt once + chosen + rejected, as qorpo tokenizes them),
peak RSS of the child, and the speedup over padded and over TRL (ratio of timed epochs). TRL is
skipped when `trl` is not installed (it is not a dependency of qorpo).

    python scripts/bench_speed.py --preset dpo512          # dpo_en_demo.json at 512 (the goal)
    python scripts/bench_speed.py --preset multiturn1024   # its rows with >= 3 turns, at 1024
    python scripts/bench_speed.py --preset tiny            # 2-layer model: per-step overhead
    python scripts/bench_speed.py --preset multiturn1024 --variants padded,packed --low-cpu-memory
                                              # live memory of each layout (peak RSS, pinned)
    python scripts/bench_speed.py --preset dpo512 --device cuda   # the GPU shapes (see below)

On CUDA the shared and packed layouts run on FlexAttention's block mask (qorpo's default there),
a fifth variant, packed-sdpa, runs the packed layout on sdpa with a dense mask (the fallback;
--attn-implementation sdpa), and the memory column is max_memory_allocated.

The data presets read ../shared/data/dpo_en_demo.json (LLaMA-Factory's demo set; pass --data).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
VARIANTS = ("padded", "shared", "packed", "trl")
# packed-sdpa: the packed layout on sdpa with a dense mask, which is what a CUDA run falls back
# to when FlexAttention cannot train there (on the CPU, sdpa means the per-pair kernels: the
# same as packed); part of the --device cuda run by default.
CUDA_VARIANTS = ("padded", "shared", "packed", "packed-sdpa", "trl")
FLAGS = {"padded": {"prefix_sharing": False}, "shared": {"packing": False}, "packed": {},
         "packed-sdpa": {"attn_implementation": "sdpa"}}
# name: (max_length, pairs per micro-batch, pairs per epoch, minimum prompt turns, model)
PRESETS: dict[str, dict[str, Any]] = {
    "dpo512": dict(max_length=512, batch=4, pairs=8, min_turns=1, model="demo"),
    "multiturn1024": dict(max_length=1024, batch=4, pairs=8, min_turns=3, model="demo"),
    "tiny": dict(max_length=96, batch=4, pairs=200, min_turns=1, model="tiny"),
}
# On a GPU (the shapes a CUDA run should fill): the same data presets in bf16, 8 pairs per
# micro-batch, 32 pairs per epoch; SmolLM2-135M by default, any local model with --model
# (e.g. a Llama-3.1-8B-Instruct folder: the prompt's share of the compute grows with the model).
CUDA_PRESET = dict(batch=8, pairs=32)


# ----------------------------------------------------------------------------- data
def select_rows(path: Path, min_turns: int, count: int) -> list[dict[str, Any]]:
    """`count` rows with at least `min_turns` prompt turns, spread evenly over the file (not
    the first ones: the prompt share varies along it), in TRL's conversational format (both
    trainers read it). Long rows are kept: each trainer truncates them to max_length (qorpo
    keeps the end of a long prompt, up to half of max_length)."""
    rows = json.loads(path.read_text())
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    eligible = [r for r in rows if sum(t["from"] != "system" for t in r["conversations"])
                >= min_turns]
    if len(eligible) < count:
        raise SystemExit(f"{path}: only {len(eligible)} rows with >= {min_turns} turns")
    picked = [eligible[i * len(eligible) // count] for i in range(count)]
    return [{"prompt": [{"role": roles[t["from"]], "content": t["value"]}
                        for t in row["conversations"]],
             "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}]}
            for row in picked]


def synthetic_rows(count: int) -> list[dict[str, Any]]:
    import random

    rng = random.Random(0)
    words = "apple river stone cloud green table music paper light ocean".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    return [{"prompt": [{"role": "user", "content": text(rng.randint(4, 24))}],
             "chosen": [{"role": "assistant", "content": text(rng.randint(2, 16))}],
             "rejected": [{"role": "assistant", "content": text(rng.randint(2, 16))}]}
            for _ in range(count)]


def token_stats(data: Path, model: str, max_length: int) -> dict[str, float]:
    """Unique tokens (prompt once + both responses) and the prompt share, as qorpo sees them."""
    from qorpo.config import TrainConfig
    from qorpo.data.prepare import prepare_data
    from qorpo.model import load_tokenizer

    cfg = TrainConfig(model=model, data=str(data), max_length=max_length, min_response_tokens=1)
    prepared = prepare_data(cfg, load_tokenizer(cfg))
    prompt = unique = padded = 0
    for ex in prepared.train:
        p = int(ex["chosen_response_start"])
        c, r = len(ex["chosen_input_ids"]) - p, len(ex["rejected_input_ids"]) - p
        prompt, unique, padded = prompt + p, unique + p + c + r, padded + 2 * p + c + r
    return {"pairs": len(prepared.train), "unique_tokens": unique, "prompt_share": prompt / unique,
            "duplicated_share": (padded - unique) / padded}


# ----------------------------------------------------------------------------- children
class EpochTimer:
    """TrainerCallback: wall time of the second epoch's optimizer steps."""

    def __init__(self, steps_per_epoch: int) -> None:
        self.per_epoch, self.ends = steps_per_epoch, {}

    def __getattr__(self, name: str) -> Any:  # every other TrainerCallback event: no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.per_epoch:
            self.ends[0] = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.ends[state.global_step] = time.perf_counter()

    def seconds(self) -> float:
        return self.ends[2 * self.per_epoch] - self.ends[0]


def child(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    steps = spec["pairs"] // spec["batch"]
    timer = EpochTimer(steps)
    out = Path(spec["work"]) / f"out-{variant}"
    if variant == "trl":
        _trl(spec, timer, out)
    else:
        _qorpo(variant, spec, timer, out)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"variant": variant, "seconds": timer.seconds(), "steps": steps,
            "peak_rss_mb": _peak_rss_mb(), "peak_cuda_mb": peak_cuda}


def _qorpo(variant: str, spec: dict[str, Any], timer: EpochTimer, out: Path) -> None:
    from rich.console import Console

    import qorpo.api as qa
    from qorpo.api import train

    real = qa.build_trainer

    def build(*a: Any, **k: Any) -> Any:
        trainer = real(*a, **k)
        trainer.add_callback(timer)
        return trainer

    qa.build_trainer = build
    train(model=spec["model"], data=spec["data"], output_dir=str(out), overwrite=True,
          max_length=spec["max_length"], batch_size=spec["batch"], grad_accum=1, epochs=2,
          learning_rate=5e-5, warmup_ratio=0.0, logging_steps=1, save_steps=10**6,
          group_by_length=False, dtype=spec["dtype"], min_response_tokens=1,
          low_cpu_memory=spec.get("low_cpu_memory"),
          console=Console(quiet=True), **FLAGS[variant])


def _trl(spec: dict[str, Any], timer: EpochTimer, out: Path) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant,
                                                 dtype=dtype)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    args = ORPOConfig(
        output_dir=str(out), beta=0.1, max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, num_train_epochs=2, learning_rate=5e-5,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to="none", seed=42,
        use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bf16", disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = ORPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tok, peft_config=lora)
    trainer.add_callback(timer)
    trainer.train()


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:  # VmHWM: this process's own peak, not its parent's
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(variant: str, spec: dict[str, Any], *, script: str = __file__,
              env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Run `script --child VARIANT --spec …` in a fresh process (`env` added to its
    environment); its last JSON line, or None (its stderr printed) when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, script, "--child", variant, "--spec",
                           json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- main
def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    preset = dict(PRESETS[args.preset])
    if args.pairs:
        preset["pairs"] = args.pairs
    if args.batch:
        preset["batch"] = args.batch
    if args.device == "cuda":
        preset.update(batch=CUDA_PRESET["batch"], pairs=CUDA_PRESET["pairs"])
    if preset["model"] == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.tiny import make_model

        model = str(make_model(work / "tiny", arch="llama"))
        rows = synthetic_rows(preset["pairs"])
    else:
        from qorpo.demo import ensure_demo_model

        model = args.model or str(ensure_demo_model())
        if not args.data.is_file():
            raise SystemExit(f"{args.data} not found: pass --data dpo_en_demo.json")
        rows = select_rows(args.data, preset["min_turns"], preset["pairs"])
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dict(preset, model=model, data=str(data), work=str(work), device=args.device,
                dtype="bf16" if args.device == "cuda" else "fp32", threads=args.threads,
                low_cpu_memory=bool(args.low_cpu_memory))  # never left to qorpo's choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="dpo512")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--model", help="model folder (default: the offline demo model)")
    parser.add_argument("--variants", help=f"comma separated (default: {','.join(VARIANTS)}; "
                        f"with --device cuda {','.join(CUDA_VARIANTS)})")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating")
    parser.add_argument("--pairs", type=int, default=0, help="pairs per epoch (preset's)")
    parser.add_argument("--batch", type=int, default=0, help="pairs per micro-batch (preset's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--low-cpu-memory", action="store_true",
                        help="qorpo's variants with glibc's thresholds pinned: peak RSS is then "
                        "the live memory (slower; TRL keeps the default allocator)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.spec))), flush=True)
        return

    chosen = args.variants or ",".join(CUDA_VARIANTS if args.device == "cuda" else VARIANTS)
    variants = [v for v in chosen.split(",") if v]
    if args.device == "cpu" and "packed-sdpa" in variants:
        raise SystemExit("packed-sdpa differs from packed only with --device cuda (on the CPU "
                         "the per-pair kernels are sdpa)")
    if "trl" in variants:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: its row is skipped (pip install trl to include it)")
            variants.remove("trl")
    with tempfile.TemporaryDirectory(prefix="qorpo-bench-speed-") as tmp:
        spec = prepare(args, Path(tmp))
        stats = token_stats(Path(spec["data"]), spec["model"], spec["max_length"])
        print(f"{args.preset}: {stats['pairs']} pairs, {spec['batch']} per micro-batch, "
              f"max_length {spec['max_length']}; prompt share {stats['prompt_share']:.1%} of "
              f"unique tokens, {stats['duplicated_share']:.1%} of padded-layout tokens are a "
              f"repeated prompt")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for v in variants:
                res = run_child(v, spec)
                if res is not None:
                    runs[v].append(res)
                    print(f"  run {rep + 1} {v}: {res['seconds']:.2f} s")
    report(args, spec, stats, runs)


def report(args: argparse.Namespace, spec: dict[str, Any], stats: dict[str, float],
           runs: dict[str, list[dict[str, Any]]]) -> None:
    best = {v: min(r["seconds"] for r in rs) for v, rs in runs.items() if rs}
    rows = []
    for v, rs in runs.items():
        if not rs:
            continue
        sec, steps = best[v], rs[0]["steps"]
        rows.append({
            "variant": v, "seconds": round(sec, 3), "s_per_step": round(sec / steps, 3),
            "median_seconds": round(statistics.median(r["seconds"] for r in rs), 3),
            "pairs_per_s": round(stats["pairs"] / sec, 3),
            "tokens_per_s": round(stats["unique_tokens"] / sec, 1),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)),
            "peak_cuda_mb": (round(max(r["peak_cuda_mb"] for r in rs))
                             if rs[0].get("peak_cuda_mb") is not None else None),
            "vs_padded": round(best["padded"] / sec, 3) if "padded" in best else None,
            "vs_trl": round(best["trl"] / sec, 3) if "trl" in best else None,
        })
    cuda = args.device == "cuda"
    head = ("variant", "s/step", "pairs/s", "tokens/s",
            "peak CUDA MB (max allocated)" if cuda else "peak RSS MB", "vs padded", "vs TRL")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = (r["variant"], r["s_per_step"], r["pairs_per_s"], r["tokens_per_s"],
                 r["peak_cuda_mb"] if cuda else r["peak_rss_mb"], _x(r["vs_padded"]),
                 _x(r["vs_trl"]))
        print("| " + " | ".join(str(c) for c in cells) + " |")
    summary = {"preset": args.preset, "device": args.device, "repeats": args.repeats,
               "low_cpu_memory": spec["low_cpu_memory"],
               "pairs": stats["pairs"], "batch": spec["batch"], "max_length": spec["max_length"],
               "prompt_share": round(stats["prompt_share"], 4), "rows": rows}
    print(json.dumps(summary))


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    main()

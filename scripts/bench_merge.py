"""Peak memory of the streaming merge vs the full (peft merge_and_unload) merge.

Generates a random Llama-style model of about ``--size-mb`` (fp32, sharded at ``--shard-mb``)
plus a LoRA adapter on every linear layer, then runs each merge in its own child process and
reads that child's peak RSS (``VmHWM`` from /proc: unlike ``ru_maxrss`` it is not inherited
from the parent across fork + exec). A child that only imports the libraries (torch,
transformers + the Llama modeling code, peft, bitsandbytes, qorpo.merge) gives the interpreter
baseline, which is subtracted. Goal: streaming peak - baseline <= 1.2 x largest input shard +
adapter size. Prints a table and, last, one JSON line.

    python scripts/bench_merge.py                 # ~600 MB fp32 model, < 2 min on 2 cores
    python scripts/bench_merge.py --size-mb 2000 --shard-mb 500
    python scripts/bench_merge.py --moe           # Qwen3-MoE: r=16 on attention + experts
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 1024, 2816, 32000, 16, 4
EXPERTS, MOE_INTER = 32, 512  # --moe: a Qwen3-MoE layer of 32 experts, 2 per token


def _layer_params() -> int:
    kv = HIDDEN * HIDDEN * KV_HEADS // HEADS
    return 2 * HIDDEN * HIDDEN + 2 * kv + 3 * HIDDEN * INTER + 2 * HIDDEN


def _moe_layer_params() -> int:
    kv = HIDDEN * HIDDEN * KV_HEADS // HEADS
    return 2 * HIDDEN * HIDDEN + 2 * kv + EXPERTS * (3 * HIDDEN * MOE_INTER + HIDDEN)


def generate(work: Path, size_mb: int, shard_mb: int, rank: int, moe: bool = False) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_tokenizer

    emb = 2 * VOCAB * HIDDEN
    per_layer = _moe_layer_params() if moe else _layer_params()
    layers = max(1, round((size_mb * 1e6 / 4 - emb) / per_layer))
    config_class = Qwen3MoeConfig if moe else LlamaConfig
    sizes = dict(num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=MOE_INTER,
                 head_dim=HIDDEN // HEADS) if moe else {}
    cfg = config_class(
        **sizes,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    model.save_pretrained(str(work / "base"), max_shard_size=f"{shard_mb}MB")
    make_tokenizer(work / "base")
    targets: Any = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if moe:  # qorpo's default: peft turns it into target_parameters for the experts
        targets = "all-linear"
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(work / "adapter"))


def peak_rss_kb() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, may be inherited


def child(role: str, work: Path, args: argparse.Namespace) -> None:
    """One measured run; prints {"peak_kb", "seconds"} as its last line."""
    if role == "generate":
        generate(work, args.size_mb, args.shard_mb, args.rank, args.moe)
        return
    import bitsandbytes  # noqa: F401 - same imports as a merge, so the baseline is comparable
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    from qorpo.merging import merge

    start = time.perf_counter()
    if role != "baseline":
        method, _, into = role.partition("-")
        merge(
            work / "adapter",
            work / f"out-{role}",
            base=work / "base",
            method=method,
            into=into or "original",
            dtype="fp32",
            verify=False,
            force=True,
        )
    print(json.dumps({"peak_kb": peak_rss_kb(), "seconds": time.perf_counter() - start}))


def run_child(role: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", role, "--workdir", str(work)]
    cmd += ["--size-mb", str(args.size_mb), "--shard-mb", str(args.shard_mb)]
    cmd += ["--rank", str(args.rank)] + (["--moe"] if args.moe else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{role} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if role != "generate" else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=600, help="model size in fp32 (approximate)")
    ap.add_argument("--shard-mb", type=int, default=100, help="base checkpoint shard size")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (all linear layers)")
    ap.add_argument("--moe", action="store_true", help="a Qwen3-MoE model (32 experts)")
    ap.add_argument("--runs", default="stream,stream-dequantized,full", help="comma list")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: tmp)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.workdir, args)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report(work, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def report(work: Path, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if not (work / "adapter" / "adapter_config.json").is_file():
        run_child("generate", work, args)  # in a child, so this process stays small
    gen_s = time.perf_counter() - t0
    shards = sorted((work / "base").glob("*.safetensors"))
    model_mb = sum(f.stat().st_size for f in shards) / 2**20
    largest_mb = max(f.stat().st_size for f in shards) / 2**20
    adapter_mb = (work / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    base_kb = run_child("baseline", work, args)["peak_kb"]
    results = {role: run_child(role, work, args) for role in args.runs.split(",")}
    net = {role: (r["peak_kb"] - base_kb) / 1024 for role, r in results.items()}
    goal_mb = 1.2 * largest_mb + adapter_mb
    rows = [(role, r["peak_kb"] / 1024, net[role], r["seconds"]) for role, r in results.items()]
    _print_table(rows, model_mb, len(shards), largest_mb, adapter_mb, base_kb / 1024, goal_mb)
    summary = {
        "model_mb": round(model_mb, 1),
        "shards": len(shards),
        "largest_shard_mb": round(largest_mb, 1),
        "adapter_mb": round(adapter_mb, 1),
        "baseline_rss_mb": round(base_kb / 1024, 1),
        **{f"{role}_net_peak_mb": round(v, 1) for role, v in net.items()},
        **{f"{role}_s": round(r["seconds"], 1) for role, r in results.items()},
        "goal_mb": round(goal_mb, 1),
        "generate_s": round(gen_s, 1),
    }
    if "stream" in net:
        summary["goal_met"] = net["stream"] <= goal_mb
        summary["stream_over_largest_shard"] = round(net["stream"] / largest_mb, 2)
        if "full" in net:
            summary["full_over_stream"] = round(net["full"] / max(net["stream"], 1e-9), 2)
    print(json.dumps(summary))


def _print_table(rows, model_mb, n_shards, largest_mb, adapter_mb, base_mb, goal_mb) -> None:  # type: ignore[no-untyped-def]
    head = (
        f"model {model_mb:.0f} MB fp32 in {n_shards} shards (largest {largest_mb:.0f} MB), "
        f"adapter {adapter_mb:.1f} MB, baseline RSS {base_mb:.0f} MB (imports only), "
        f"goal: stream net peak <= {goal_mb:.0f} MB"
    )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=head)
        for col in ("run", "peak RSS MB", "net of baseline MB", "seconds"):
            table.add_column(col, justify="right" if col != "run" else "left")
        for role, peak, net, secs in rows:
            table.add_row(role, f"{peak:.0f}", f"{net:.0f}", f"{secs:.1f}")
        Console().print(table)
    except ImportError:
        print(head)
        for role, peak, net, secs in rows:
            print(f"{role:20s} {peak:8.0f} {net:8.0f} {secs:6.1f}")


if __name__ == "__main__":
    main()

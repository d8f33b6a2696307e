"""Peak memory and time of the loss path: qorpo's chunked log-probs vs the naive full-logits path.

Each variant runs forward + backward of `sum(log p(target))` over N scored tokens, in its own
child process, and reports the *extra* memory the loss path needs beyond its inputs (hidden
states and the frozen head): peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA.

    python scripts/bench_loss.py                      # vocab 128,256, 4,096 tokens, H 512 on CPU
    python scripts/bench_loss.py --hidden 4096        # Llama-3-8B shapes (GPU, or a patient CPU)

Variants: `naive` (TRL-style: full logits → log_softmax → gather), `ckpt-1024` (the same per
1024-token chunk under torch.utils.checkpoint), `qorpo-C` (qorpo.loss.chunked_token_logps with
chunk_size C). Prints a table and a final JSON line with the ratios against `naive`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _naive(h, w, t):
    return F.linear(h, w).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)


def _ckpt(h, w, t, chunk=1024):
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(_naive, h[s:s + chunk], w, t[s:s + chunk], use_reentrant=False)
             for s in range(0, h.shape[0], chunk)]
    return torch.cat(parts)


def _run(variant: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    from qorpo.loss import OutputHead, chunked_token_logps

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    w = torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype) * 0.02  # frozen head
    t = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    fn = {"naive": _naive, "ckpt-1024": _ckpt}.get(variant)
    if fn is None:
        chunk = int(variant.split("-")[1])
        fn = lambda h, w, t: chunked_token_logps(h, OutputHead(w), t, chunk)  # noqa: E731
    times = []
    for rep in range(args.repeats + 1):  # first run warms up; it also sets the memory peak
        h = torch.randn(args.tokens, args.hidden, device=dev, dtype=dtype, requires_grad=True)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if dev == "cuda" else _rss_bytes()
        start = time.perf_counter()
        fn(h, w, t).sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - start)
        if rep == 0:
            if dev == "cuda":
                extra = torch.cuda.max_memory_allocated() - base
            else:
                extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        del h
    queue.put({"variant": variant, "extra_mb": extra / 2**20, "seconds": min(times),
               "device": dev, "dtype": str(dtype).replace("torch.", "")})


def measure(variant: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")  # a fresh process: its peak RSS is this variant's alone
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(variant, args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{variant}: child process failed (exit {proc.exitcode})")
    return queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=None, help="default 4096 on CUDA, 512 on CPU")
    p.add_argument("--chunks", default="128,256,512,1024")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.hidden is None:
        args.hidden = 4096 if torch.cuda.is_available() else 512
    variants = ["naive", "ckpt-1024"] + [f"qorpo-{c}" for c in args.chunks.split(",")]
    rows = [measure(v, args) for v in variants]
    naive = rows[0]
    print(f"\nloss path, vocab {args.vocab:,}, {args.tokens:,} scored tokens, H {args.hidden}, "
          f"{naive['device']} {naive['dtype']} (forward + backward, best of {args.repeats})")
    print(f"{'variant':<12} {'extra MB':>10} {'mem ratio':>10} {'seconds':>9} {'speedup':>8}")
    for r in rows:
        r["mem_ratio"] = naive["extra_mb"] / max(r["extra_mb"], 1e-9)
        r["speedup"] = naive["seconds"] / r["seconds"]
        print(f"{r['variant']:<12} {r['extra_mb']:>10.1f} {r['mem_ratio']:>9.1f}x "
              f"{r['seconds']:>9.3f} {r['speedup']:>7.2f}x")
    from qorpo.config import DEFAULT_CHUNK_SIZE

    default = next((r for r in rows if r["variant"] == f"qorpo-{DEFAULT_CHUNK_SIZE}"), None)
    summary = {"bench": "loss", "vocab": args.vocab, "tokens": args.tokens,
               "hidden": args.hidden, "device": naive["device"], "results": rows}
    if default is not None:
        # the goal: at most 1/10 of the naive path's extra memory, at equal or better speed
        summary.update(default_chunk=DEFAULT_CHUNK_SIZE, mem_ratio=default["mem_ratio"],
                       speedup=default["speedup"], memory_goal_met=default["mem_ratio"] >= 10)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""What `qorpo train` shows: the start table, a rich progress bar (loss, reward accuracy,
tokens/s, ETA) and the summary table. Works in a terminal and in notebooks (rich renders to
Jupyter too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from transformers import TrainerCallback

from qorpo.config import TrainConfig


class RichProgressCallback(TrainerCallback):
    def __init__(self, console: Console, total_steps: int) -> None:
        self.console, self.total = console, total_steps
        self.progress: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps or self.total,
                                           completed=state.global_step, stats="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            stats = (f"loss {logs['loss']:.4f}  acc {logs.get('rewards/accuracy', 0):.2f}  "
                     f"margin {logs.get('rewards/margin', 0):+.4f}  "
                     f"{logs.get('tokens_per_second', 0):,.0f} tok/s")
            self.progress.update(self.task, stats=stats)
            self.progress.console.log(f"step {state.global_step}: {stats}  "
                                      f"lr {logs.get('learning_rate', 0):.2e}  "
                                      f"grad norm {logs.get('grad_norm', 0):.3f}")
        elif any(k.startswith("eval_") for k in logs):
            self.progress.console.log(
                f"eval @ step {state.global_step}: loss {logs.get('eval_loss', 0):.4f}  "
                f"acc {logs.get('eval_rewards/accuracy', 0):.2f}  "
                f"margin {logs.get('eval_rewards/margin', 0):+.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def print_note(console: Console, text: str) -> None:
    """One line of something the user should know (a choice made for them, a fallback)."""
    console.print(f"[yellow]note:[/] {text}")


def dry_run_line(pairs: int, steps: int) -> str:
    return f"[green]Dry run: {pairs} pairs → {steps} optimizer steps. No weights loaded.[/]"


def parity_line(parity: Any, layout: str, trainable: int, total: int) -> str:
    """The start-up parity check's result (qorpo.forward.ParityReport) and LoRA's size."""
    same = "" if layout == "padded" else (f"; the {layout} layout scores them as padded does "
                                          f"(to {parity.layout_diff:.1e})")
    return (f"Parity check passed: chunked log-probs match the model's logits to "
            f"{parity.max_abs_diff:.1e} over {parity.tokens} tokens{same}. LoRA: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%).")


def start_table(cfg: TrainConfig, device: torch.device, dtype: Any, data: Any,
                steps: int, processes: int = 1) -> Table:
    t = Table(title="qorpo train", show_header=False, title_justify="left")
    t.add_column(style="bold cyan")
    t.add_column()
    gpu = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        gpu = f" — {torch.cuda.get_device_name(device)}, {total / 2**30:.1f} GB"
    t.add_row("model", f"{cfg.model} ({cfg.quant})")
    t.add_row("device", f"{device}{gpu}")
    t.add_row("dtype", f"{dtype.name} — {dtype.reason}")
    targets = ",".join(cfg.lora_targets)
    t.add_row("LoRA", f"r={cfg.lora_r} alpha={cfg.lora_alpha:g} dropout={cfg.lora_dropout:g} "
                      f"targets={targets}{' rslora' if cfg.use_rslora else ''}")
    t.add_row("data", f"{cfg.data} — format {data.format}, {len(data.train)} train pairs"
                      + (f", {len(data.eval)} eval" if data.eval is not None else ""))
    t.add_row("ORPO", f"beta={cfg.beta:g} sft_on_prompt={cfg.sft_on_prompt} "
                      f"chunk_size={cfg.chunk_size}")
    t.add_row("layout", {"padded": "padded: two rows per pair",
                         "shared": "prefix sharing: the prompt computed once per pair",
                         "packed": "prefix sharing + packing: the prompt once, no padding"}[
                             cfg.layout])
    t.add_row("attention", attention_line(cfg, device.type))
    per_step = cfg.batch_size * cfg.grad_accum * processes
    ranks = f" × {processes} processes" if processes > 1 else ""
    t.add_row("steps", f"{steps} × {cfg.batch_size} pairs × {cfg.grad_accum} accum{ranks} "
                       f"= {per_step} pairs/step, lr {cfg.learning_rate:g} ({cfg.lr_scheduler})")
    if processes > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        t.add_row("processes", f"{processes} ({backend}); per process: {cfg.batch_size} pairs "
                               f"per micro-batch, {cfg.grad_accum} micro-batches per step")
    t.add_row("output", cfg.output_dir)
    return t


def attention_line(cfg: TrainConfig, device: str) -> str:
    """The attention kernel this run plans (qorpo.attention.choice; it may still fall back)."""
    from qorpo.attention import FLEX, PAIR_ATTENTION
    from qorpo.attention.cost import MIN_ROW_LENGTH
    from qorpo.attention.plan import planned
    from qorpo.quant import fsdp_active

    kernel = planned(device, cfg.layout, cfg.attn_implementation)
    if kernel == PAIR_ATTENTION:
        return (f"per-pair SDPA calls on rows of {MIN_ROW_LENGTH}+ tokens: no masked block "
                "computed")
    if kernel == FLEX:
        checked = "unchecked under FSDP" if fsdp_active() else "compiled, checked at start-up"
        return f"FlexAttention block mask: masked blocks skipped ({checked})"
    return cfg.attn_implementation or "the model's default (sdpa where it has it)"


def summary_table(out_dir: Path, metrics: dict[str, float], before: dict[str, float],
                  gens: list[dict[str, str]]) -> Table:
    t = Table(title="qorpo: done", title_justify="left")
    t.add_column("metric")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    keys = ["eval_loss", "eval_nll", "eval_ratio_loss", "eval_rewards/accuracy",
            "eval_rewards/margin", "eval_logps/chosen", "eval_logps/rejected"]
    for k in keys:
        if k in metrics:
            b = f"{before[k]:.4f}" if k in before else "—"
            t.add_row(k, b, f"{metrics[k]:.4f}")
    for k in ("train_loss", "train_runtime"):
        if k in metrics:
            t.add_row(k, "—", f"{metrics[k]:.4f}")
    if "peak_memory_gib" in metrics:  # before = the estimate, after = what it really took
        est = f"{metrics['peak_memory_estimate_gib']:.2f}"
        if "peak_memory_bound_gib" in metrics:  # CPU, glibc's default allocator: a range
            est += f"-{metrics['peak_memory_bound_gib']:.2f}"
        t.add_row("peak memory GiB (estimate → measured)", est, f"{metrics['peak_memory_gib']:.2f}")
    for g in gens:
        t.add_row(f"[bold]prompt[/] {g['prompt']}", "", "")
        t.add_row("  before", "", g["before"])
        t.add_row("  after", "", g["after"])
    import shlex  # the printed merge command must paste into a shell as is (spaces, quotes)

    from rich.markup import escape

    merge_cmd = f"qorpo merge {shlex.quote(str(out_dir))} --out {shlex.quote(f'{out_dir}-merged')}"
    q = shlex.quote(str(out_dir))
    t.caption = (f"adapter, tokenizer, qorpo_config.yaml, metrics.jsonl, curves.png → "
                 f"{escape(str(out_dir))}\nscore held-out pairs: {escape(f'qorpo eval {q}')}\n"
                 f"merge: {escape(merge_cmd)}")
    return t


def estimate_table(est: Any, title: str = "memory estimate") -> Table:
    """A qorpo.memory.plan.RunEstimate: components, total, the device and what to change."""
    gib = 2**30
    t = Table(title=f"{title} ({est.device}: "
                    + ("peak RSS" if est.device == "cpu" else "GPU memory") + ")",
              title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    for name, value in est.peak._asdict().items():
        if name != "naive_logits" and value:
            t.add_row(name.replace("_", " "), f"{value / gib:.2f}")
    t.add_row("[bold]total[/] (longest pairs)", f"[bold]{est.peak.total / gib:.2f}[/]")
    t.add_row("typical micro-batch (median pairs)", f"{est.typical.total / gib:.2f}")
    if est.default_bound is not None:
        t.add_row("allocator", "pinned" if est.low_cpu_memory else
                  f"glibc default: up to {est.default_bound / gib:.2f}")
    if est.capacity is not None:
        verdict = "[green]fits[/]" if est.fits else "[red]does not fit[/]"
        t.add_row(f"{est.capacity.source}", f"{est.capacity.bytes / gib:.2f}")
        t.add_row(verdict, f"headroom {est.headroom / gib:+.2f}")
        for knob in est.knobs[:4]:
            mark = "fits" if knob.fits else "still too big"
            t.add_row(f"  try {knob.change}", f"{knob.total / gib:.2f} ({mark})")
    if est.note:
        t.caption = est.note
    return t

"""`qorpo.train(config)`: setup → build → fit, for the CLI and for notebooks alike."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console

import qorpo.runs as runs
from qorpo.config import TrainConfig
from qorpo.demo import DEMO_PROMPTS
from qorpo.errors import ConfigError, Terminated, terminate_as_interrupt
from qorpo.memory.plan import peak_measured
from qorpo.progress import (
    RichProgressCallback,
    estimate_table,
    start_table,
    summary_table,
)
from qorpo.sysmem import allocator, pin_malloc_thresholds

# The demo (no --model and no --data): sized to finish in a few minutes on a 2-core CPU.
# Applied only to options the user left at their defaults.
DEMO_OVERRIDES: dict[str, Any] = dict(
    max_length=192, learning_rate=5e-4, max_steps=12, batch_size=4,
    grad_accum=2, logging_steps=2, save_steps=1000, output_dir="outputs/demo", warmup_ratio=0.05,
    # 135M parameters fit any machine: recomputing activations would only cost CPU time
    gradient_checkpointing=False,
)


class TrainResult(NamedTuple):
    output_dir: Path  # adapter, tokenizer, qorpo_config.yaml, metrics.jsonl, checkpoints
    metrics: dict[str, float]  # final train metrics and (if any) eval metrics after training
    eval_before: dict[str, float]  # eval metrics before the first step (empty without eval set)
    generations: list[dict[str, str]]  # demo only: prompt, before, after
    memory: Any = None  # qorpo.memory.plan.RunEstimate: the estimate for this run


def resolve_config(config: TrainConfig | dict | str | Path | None = None,
                   **overrides: Any) -> TrainConfig:
    if isinstance(config, TrainConfig):
        cfg = dataclasses.replace(config, **overrides).validate()
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict({**config, **overrides})
    else:
        cfg = TrainConfig.load(config, overrides)
    return cfg


def is_demo(cfg: TrainConfig) -> bool:
    return cfg.model is None and cfg.data is None


def apply_demo_defaults(cfg: TrainConfig, console: Console) -> TrainConfig:
    """Fill in the offline demo model and data (and demo sizes where left at defaults)."""
    from qorpo.demo import demo_data_files, ensure_demo_model

    default = TrainConfig()
    changes = {k: v for k, v in DEMO_OVERRIDES.items() if getattr(cfg, k) == getattr(default, k)}
    files = demo_data_files()
    model_dir = ensure_demo_model(console=console)
    changes.update(model=str(model_dir), data=str(files.train), eval_data=str(files.eval))
    return dataclasses.replace(cfg, **changes).validate()


def train(config: TrainConfig | dict | str | Path | None = None, *, dry_run: bool = False,
          console: Console | None = None, **overrides: Any) -> TrainResult:
    """Train a LoRA adapter with ORPO. `config`: a TrainConfig, a dict, a YAML path or None;
    keyword overrides win. Returns where everything went and the final metrics."""
    console = console or Console()
    cfg = resolve_config(config, **overrides)
    if cfg.low_cpu_memory:
        pin_malloc_thresholds()  # before anything large is allocated (see qorpo.sysmem)
    if cfg.model and Path(cfg.model).expanduser().exists():
        cfg = dataclasses.replace(cfg, model=str(Path(cfg.model).expanduser()))
    demo_run = is_demo(cfg)
    if demo_run:
        console.print("[bold]No --model/--data given: running the offline demo "
                      "(SmolLM2-135M-Instruct on qorpo's demo preference set).[/]")
        cfg = apply_demo_defaults(cfg, console)
    elif cfg.model is None or cfg.data is None:
        raise ConfigError(["give both --model and --data (or neither, for the offline demo)"])

    # ---- setup: everything a user can get wrong is found here, before any weight is loaded
    from accelerate import PartialState

    from qorpo.data.prepare import prepare_data
    from qorpo.model import (
        check_attn_implementation,
        choose_dtype,
        device_of_process,
        load_tokenizer,
    )

    # Under torchrun / accelerate launch this joins the process group now: ranks can then take
    # turns (rank 0 prepares the data first, e.g. fills the datasets cache) and only rank 0
    # prints and writes. A single process gets a trivial state.
    device = device_of_process()
    check_attn_implementation(cfg.attn_implementation, device)
    procs = PartialState(cpu=device.type == "cpu")  # (on CPU accelerate needs to be told)
    if not procs.is_main_process:
        console = Console(quiet=True)
    fp = runs.fingerprint(cfg)
    cfg, plan = plan_run(cfg, fp)
    dtype = choose_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    with procs.main_process_first():
        data = prepare_data(cfg, tokenizer, console=console)
    steps = planned_steps(cfg, len(data.train), procs.num_processes)
    console.print(start_table(cfg, device, dtype, data, steps, procs.num_processes))
    memory = memory_estimate(cfg, data, device.type)
    if dry_run or (memory.fits is False):
        console.print(estimate_table(memory))
    elif memory.low_cpu_memory and cfg.low_cpu_memory is None:
        console.print(f"[yellow]note:[/] {memory.note}")  # chosen for this run: say so
    if memory.low_cpu_memory and not cfg.low_cpu_memory and not dry_run:
        pin_malloc_thresholds()  # before the model loads (the estimate chose it)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
    if plan.resume_from is not None:
        console.print(f"Resuming from {plan.resume_from}")
    if dry_run:
        console.print(f"[green]Dry run: {len(data.train)} pairs → {steps} optimizer steps. "
                      "No weights loaded.[/]")
        return TrainResult(plan.out_dir, {"steps": float(steps)}, {}, [], memory)

    # ---- build
    from transformers import set_seed

    from qorpo.data.collate import pairs_from_features
    from qorpo.forward import parity_check, supports_layout
    from qorpo.kernels import FLEX, agree, choose, planned
    from qorpo.model import add_lora, load_base_model

    set_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same adapter
    with console.status(f"Loading {cfg.model} ({cfg.quant}, {dtype.name})…"):
        model = load_base_model(cfg, dtype.dtype, device)
        model = add_lora(model, cfg, dtype.dtype)
    layout, fell_back = cfg.layout, False
    if layout != "padded":
        support = supports_layout(model, layout, max_seq_len=cfg.max_length)
        if not support.ok:
            console.print(f"[yellow]note:[/] prefix sharing off for this model — "
                          f"{support.reason}; using the padded layout")
            layout, fell_back = "padded", True
        else:  # a kernel that skips the masked blocks (qorpo.kernels); the parity check below
            kernel = planned(device.type, layout, cfg.attn_implementation)  # compares it too
            with (console.status("Compiling FlexAttention's kernels and checking them…")
                  if kernel == FLEX else contextlib.nullcontext()):
                choice = agree(choose(model, device.type, layout, cfg.attn_implementation),
                               model)
            if choice.note:
                console.print(f"[yellow]note:[/] {choice.note}" if choice.fell_back
                              else choice.note)
            fell_back = choice.fell_back
    if fell_back:  # the summary compares the measured peak with what really runs
        memory = memory_estimate(dataclasses.replace(cfg, low_cpu_memory=memory.low_cpu_memory),
                                 data, device.type, runs_as=(layout, None))
    pairs = pairs_from_features([data.train[i] for i in range(min(2, len(data.train)))])
    parity = parity_check(model, pairs, layout, tokenizer.pad_token_id or 0, dtype.dtype)
    trainable, total = model.get_nb_trainable_parameters()
    same = "" if layout == "padded" else f"; the {layout} layout scores them as padded does " \
        f"(to {parity.layout_diff:.1e})"
    console.print(f"Parity check passed: chunked log-probs match the model's logits to "
                  f"{parity.max_abs_diff:.1e} over {parity.tokens} tokens{same}. LoRA: "
                  f"{trainable:,} trainable of {total:,} parameters "
                  f"({100 * trainable / total:.2f}%).")

    # ---- fit
    out_dir = plan.out_dir
    trainer = build_trainer(cfg, model, tokenizer, data, dtype.name, device, steps, console, fp,
                            layout=layout, eval_first=plan.resume_from is None)
    procs.wait_for_everyone()  # every rank has checked the folder before rank 0 writes to it
    if procs.is_main_process:
        runs.start(plan, cfg, fp)  # the folder is written only now that the run can start
    procs.wait_for_everyone()
    prompts = list(DEMO_PROMPTS) if demo_run else []
    gens_before = [generate(model, tokenizer, p, adapter=False) for p in prompts]
    interrupted: KeyboardInterrupt | None = None
    with terminate_as_interrupt():
        try:
            resume = str(plan.resume_from) if plan.resume_from is not None else None
            train_out = trainer.train(resume_from_checkpoint=resume)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: keep what was learned
            interrupted = exc
            for cb in trainer.callback_handler.callbacks:
                if isinstance(cb, RichProgressCallback):
                    cb.close()
        save_adapter(trainer, out_dir)
    if interrupted is not None:
        why = "Terminated (SIGTERM)" if isinstance(interrupted, Terminated) else "Interrupted"
        console.print(f"[yellow]{why}: adapter saved to {out_dir} at step "
                      f"{trainer.state.global_step}; `--resume latest` continues from the last "
                      "checkpoint.[/]")
        raise interrupted
    before = eval_before(trainer.state.log_history)
    metrics = dict(train_out.metrics)
    whole_run = whole_run_train_loss(trainer.state.log_history)
    if whole_run is not None:  # the Trainer's own counts only the steps of this process
        metrics["train_loss"] = whole_run
    if data.eval is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    gens = [{"prompt": p, "before": b, "after": generate(model, tokenizer, p, adapter=True)}
            for p, b in zip(prompts, gens_before, strict=True)]
    if procs.is_main_process:
        runs.finish(out_dir, fp, trainer.state.global_step)
    measured = peak_measured(device.type)
    if measured is not None:
        metrics["peak_memory_gib"] = measured / 2**30
        metrics["peak_memory_estimate_gib"] = (memory.peak.allocated if device.type == "cuda"
                                               else memory.peak.total) / 2**30
        if memory.default_bound is not None and not memory.low_cpu_memory:
            metrics["peak_memory_bound_gib"] = memory.default_bound / 2**30  # glibc's default
    console.print(summary_table(out_dir, metrics, before, gens))
    return TrainResult(out_dir, metrics, before, gens, memory)


def attention_cost(model: torch.nn.Module) -> float:
    """Attention's cost per (query, key) relative to a token's linear layers, ~1 / (6 H)
    (qorpo.data.collate.choose_capacity: how long packed rows may grow)."""
    from qorpo.kernels import skips_masked_blocks
    from qorpo.model import unwrap

    cfg = unwrap(model).config
    if skips_masked_blocks(getattr(cfg, "_attn_implementation", None)):
        return 0.0  # pairs sharing a row never pay for each other
    hidden = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg,
                     "hidden_size", 576)
    return 1 / (6 * int(hidden))


def memory_estimate(cfg: TrainConfig, data: Any, device: str,
                    runs_as: tuple[str, str | None] | None = None) -> Any:
    """This run's memory estimate (qorpo.memory.plan): the model's config.json, the data's
    real token lengths, the layout; on a `--gpu-memory` card if given, else on this device.
    `runs_as`: the (layout, kernel) the loaded model really runs, where it fell back from the
    planned ones (qorpo.kernels.planned)."""
    from qorpo.kernels import planned
    from qorpo.memory.plan import detect_capacity, gpu_capacity, model_shape, pair_lengths, plan

    if cfg.gpu_memory is not None:
        device, capacity = "cuda", gpu_capacity(cfg.gpu_memory)
    else:
        capacity = detect_capacity(device)
    layout, kernel = runs_as or (cfg.layout, planned(device, cfg.layout, cfg.attn_implementation))
    return plan(model_shape(cfg.model, cfg.revision, cfg.trust_remote_code),
                pair_lengths(data.train), device=device, batch_size=cfg.batch_size,
                layout=layout, max_length=cfg.max_length,
                max_prompt_length=cfg.resolved_max_prompt_length, lora_r=cfg.lora_r,
                chunk_size=cfg.chunk_size, checkpointing=cfg.gradient_checkpointing,
                low_cpu_memory=cfg.low_cpu_memory, sft_on_prompt=cfg.sft_on_prompt,
                lora_dropout=cfg.lora_dropout > 0, capacity=capacity,
                kernel=kernel, allocator=allocator())


def eval_before(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The eval metrics logged at step 0 (eval_on_start), before any update."""
    first = next((r for r in log_history if "eval_loss" in r and r.get("step") == 0), {})
    return {k: v for k, v in first.items() if k.startswith("eval_")}


def plan_run(cfg: TrainConfig, fp: dict[str, Any]) -> tuple[TrainConfig, runs.RunPlan]:
    """The output folder and resume point; the default folder moves aside rather than being
    refused: running the demo twice gives outputs/demo and outputs/demo-2."""
    try:
        return cfg, runs.plan_output_dir(cfg, fp)
    except runs.RunError:
        defaults = {TrainConfig().output_dir, DEMO_OVERRIDES["output_dir"]}
        if cfg.output_dir not in defaults or cfg.resume is not None or cfg.overwrite:
            raise
    n = 2
    while Path(f"{cfg.output_dir}-{n}").exists():
        n += 1
    moved = dataclasses.replace(cfg, output_dir=f"{cfg.output_dir}-{n}")
    plan = runs.plan_output_dir(moved, fp)
    note = f"{cfg.output_dir} holds an earlier run: this one goes to {moved.output_dir}"
    return moved, plan._replace(notes=(*plan.notes, note))


def save_adapter(trainer: Any, out_dir: Path) -> None:
    """The adapter (PEFT format) and tokenizer into out_dir, each file renamed into place so a
    kill never leaves a half-written adapter file."""
    from qorpo.hf import quiet

    staging = out_dir / ".saving"
    if trainer.is_world_process_zero() and staging.exists():  # left by a kill mid-save
        shutil.rmtree(staging)
    with quiet():
        trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    # The Trainer also pickles its TrainingArguments; qorpo_config.yaml says the same in plain
    # text, and a deployable folder holds no pickle. (Checkpoints keep theirs: resuming needs
    # them.)
    (staging / "training_args.bin").unlink(missing_ok=True)
    for f in sorted(staging.iterdir()):
        os.replace(f, out_dir / f.name)
    staging.rmdir()


def whole_run_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean loss per step over the whole run, a resumed one included: each logged loss is the
    mean of the steps since the previous log (qorpo logs at every checkpoint and at the end,
    so no step is left out); records repeated by a resume are counted once."""
    by_step = {int(r["step"]): float(r["loss"]) for r in log_history if "loss" in r}
    total, previous = 0.0, 0
    for step in sorted(by_step):
        total += by_step[step] * (step - previous)
        previous = step
    return total / previous if previous else None


def planned_steps(cfg: TrainConfig, pairs: int, processes: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(pairs / (cfg.batch_size * processes))
    return max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))


def build_trainer(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, data: Any,
                  dtype_name: str, device: torch.device, steps: int, console: Console,
                  fp: dict[str, Any], layout: str = "padded", eval_first: bool = True) -> Any:
    from transformers import TrainingArguments

    from qorpo.data.collate import PairCollator
    from qorpo.trainer import CheckpointCallback, MetricsFileCallback, ORPOTrainer

    has_eval = data.eval is not None
    optim = cfg.optim
    if optim == "auto":
        optim = "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"
    args = TrainingArguments(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, optim=optim,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        bf16=dtype_name == "bf16", fp16=dtype_name == "fp16", use_cpu=device.type == "cpu",
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps, report_to=cfg.report_to, disable_tqdm=True,
        # "before" metrics: evaluated inside train(), after the model is wrapped for DDP. (An
        # evaluate() call before train() leaves the model unwrapped for the first step under
        # torchrun/accelerate, so its gradients are never averaged across processes.)
        eval_on_start=has_eval and eval_first,
        remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
    )  # gradient checkpointing is set up by qorpo.model (non-reentrant), not by the Trainer
    trainer = ORPOTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=PairCollator(tokenizer.pad_token_id, layout=layout,
                                   sft_on_prompt=cfg.sft_on_prompt,
                                   attention_cost=attention_cost(model)),
        processing_class=tokenizer, beta=cfg.beta, chunk_size=cfg.chunk_size,
        callbacks=[MetricsFileCallback(Path(cfg.output_dir) / runs.METRICS_FILE),
                   CheckpointCallback(fp)],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(RichProgressCallback(console, steps))
    return trainer


def generate(model: Any, tokenizer: Any, prompt: str, *, adapter: bool) -> str:
    """Greedy reply to one user turn with the adapter on or off (before/after, one model)."""
    from qorpo.forward import mixed_precision
    from qorpo.hf import greedy_reply
    from qorpo.kernels import for_generation

    # mixed_precision: outside the Trainer a 16-bit QLoRA model needs autocast (fp32 norms)
    with contextlib.nullcontext() if adapter else model.disable_adapter(), \
            for_generation(model), mixed_precision(model):
        return greedy_reply(model, tokenizer, prompt).text

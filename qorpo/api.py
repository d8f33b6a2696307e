"""`qorpo.train(config)`: setup → build → fit, for the CLI and for notebooks alike."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from collections.abc import Iterator
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
from qorpo.runs import RunError
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
    demo = is_demo(cfg)
    if demo:
        console.print("[bold]No --model/--data given: running the offline demo "
                      "(SmolLM2-135M-Instruct on qorpo's demo preference set).[/]")
        cfg = apply_demo_defaults(cfg, console)
    elif cfg.model is None or cfg.data is None:
        raise ConfigError(["give both --model and --data (or neither, for the offline demo)"])
    from qorpo.preflight import check_environment

    check_environment(cfg)  # optimizer, scheduler, loggers, kernels: before anything loads

    # Under torchrun / accelerate launch this joins the process group now: ranks can then take
    # turns (rank 0 prepares the data first, e.g. fills the datasets cache) and only rank 0
    # prints and writes. A single process gets a trivial state.
    from accelerate import PartialState

    from qorpo.model import check_attn_implementation, device_of_process

    device = device_of_process()
    check_attn_implementation(cfg.attn_implementation, device)
    procs = PartialState(cpu=device.type == "cpu")  # (on CPU accelerate needs to be told)
    if not procs.is_main_process:
        console = Console(quiet=True)
    fp = runs.fingerprint(cfg)
    with claim_output_dir(cfg, fp, main_process=procs.is_main_process) as claim:
        ready = setup(claim, fp, device, procs, console, dry_run=dry_run, demo=demo)
        if dry_run:
            console.print(f"[green]Dry run: {len(ready.data.train)} pairs → {ready.steps} "
                          "optimizer steps. No weights loaded.[/]")
            return TrainResult(ready.plan.out_dir, {"steps": float(ready.steps)}, {}, [],
                               ready.memory)
        return fit(ready, build(ready, console), console)


class Setup(NamedTuple):
    """What is known before any weight loads: the run's config, folder, data and plan."""

    cfg: TrainConfig
    plan: runs.RunPlan
    fp: dict[str, Any]
    device: torch.device
    procs: Any  # accelerate.PartialState
    dtype: Any  # qorpo.model.DTypeChoice
    tokenizer: Any
    data: Any  # qorpo.data.prepare.PreparedData
    steps: int
    memory: Any  # qorpo.memory.plan.RunEstimate
    demo: bool  # the offline demo: generations before and after are shown


def setup(claim: Claim, fp: dict[str, Any], device: torch.device, procs: Any,
          console: Console, *, dry_run: bool = False, demo: bool = False) -> Setup:
    """Everything a user can get wrong is found here, before any weight is loaded."""
    from qorpo.data.prepare import prepare_data
    from qorpo.model import choose_dtype, load_tokenizer

    cfg, plan = claim
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
    return Setup(cfg, plan, fp, device, procs, dtype, tokenizer, data, steps, memory, demo)


class Built(NamedTuple):
    model: Any  # the peft model
    layout: str  # what really runs: the planned layout, or padded after a fallback
    memory: Any  # the estimate, redone for what really runs after a fallback


def build(ready: Setup, console: Console) -> Built:
    """Load the model, add LoRA, choose the layout and kernel, and check them."""
    from transformers import set_seed

    from qorpo.data.collate import pairs_from_features
    from qorpo.forward import parity_check

    cfg, dtype, device, data = ready.cfg, ready.dtype, ready.device, ready.data
    from qorpo.model import add_lora, load_base_model

    set_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same adapter
    with console.status(f"Loading {cfg.model} ({cfg.quant}, {dtype.name})…"):
        model = load_base_model(cfg, dtype.dtype, device)
        model = add_lora(model, cfg, dtype.dtype)
    layout, fell_back = choose_layout(model, cfg, device, console)
    memory = ready.memory
    if fell_back:  # the summary compares the measured peak with what really runs
        memory = memory_estimate(dataclasses.replace(cfg, low_cpu_memory=memory.low_cpu_memory),
                                 data, device.type, runs_as=(layout, None))
    pairs = pairs_from_features([data.train[i] for i in range(min(2, len(data.train)))])
    parity = parity_check(model, pairs, layout, ready.tokenizer.pad_token_id or 0, dtype.dtype)
    trainable, total = model.get_nb_trainable_parameters()
    same = "" if layout == "padded" else f"; the {layout} layout scores them as padded does " \
        f"(to {parity.layout_diff:.1e})"
    console.print(f"Parity check passed: chunked log-probs match the model's logits to "
                  f"{parity.max_abs_diff:.1e} over {parity.tokens} tokens{same}. LoRA: "
                  f"{trainable:,} trainable of {total:,} parameters "
                  f"({100 * trainable / total:.2f}%).")
    return Built(model, layout, memory)


def choose_layout(model: Any, cfg: TrainConfig, device: torch.device,
                  console: Console) -> tuple[str, bool]:
    """The layout and attention kernel this model really runs: (layout, fell_back)."""
    from qorpo.forward import supports_layout
    from qorpo.kernels import FLEX, agree, choose, planned

    layout = cfg.layout
    if layout == "padded":
        return layout, False
    support = supports_layout(model, layout, max_seq_len=cfg.max_length)
    if not support.ok:
        console.print(f"[yellow]note:[/] prefix sharing off for this model — "
                      f"{support.reason}; using the padded layout")
        return "padded", True
    # a kernel that skips the masked blocks (qorpo.kernels); the parity check compares it too
    kernel = planned(device.type, layout, cfg.attn_implementation)
    with (console.status("Compiling FlexAttention's kernels and checking them…")
          if kernel == FLEX else contextlib.nullcontext()):
        choice = agree(choose(model, device.type, layout, cfg.attn_implementation), model)
    if choice.note:
        console.print(f"[yellow]note:[/] {choice.note}" if choice.fell_back else choice.note)
    return layout, choice.fell_back


def fit(ready: Setup, built: Built, console: Console) -> TrainResult:
    """Write the run's folder, train (saving what was learned on Ctrl-C / SIGTERM), evaluate,
    and mark the run finished."""
    cfg, plan, procs, data, model = ready.cfg, ready.plan, ready.procs, ready.data, built.model
    out_dir = plan.out_dir
    trainer = build_trainer(cfg, model, ready.tokenizer, data, ready.dtype.name, ready.device,
                            ready.steps, console, ready.fp, layout=built.layout,
                            eval_first=plan.resume_from is None)
    procs.wait_for_everyone()  # every rank has checked the folder before rank 0 writes to it
    if procs.is_main_process:  # the folder is written only now that the run can start
        for note in runs.start(plan, cfg, ready.fp, base_model_identity(model, cfg)):
            console.print(f"[yellow]note:[/] {note}")
    procs.wait_for_everyone()
    prompts = list(DEMO_PROMPTS) if ready.demo else []
    gens_before = [generate(model, ready.tokenizer, p, adapter=False) for p in prompts]
    train_out = run_trainer(trainer, plan, console)
    from qorpo.trainer import whole_run_train_loss

    before = eval_before(trainer.state.log_history)
    metrics = dict(train_out.metrics)
    whole_run = whole_run_train_loss(trainer.state.log_history)
    if whole_run is not None:  # the Trainer's own counts only the steps of this process
        metrics["train_loss"] = whole_run
    if data.eval is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    gens = [{"prompt": p, "before": b,
             "after": generate(model, ready.tokenizer, p, adapter=True)}
            for p, b in zip(prompts, gens_before, strict=True)]
    if procs.is_main_process:
        runs.finish(out_dir, trainer.state.global_step)
    metrics |= measured_memory(built.memory, ready.device.type)
    console.print(summary_table(out_dir, metrics, before, gens))
    return TrainResult(out_dir, metrics, before, gens, built.memory)


def run_trainer(trainer: Any, plan: runs.RunPlan, console: Console) -> Any:
    """trainer.train(); on Ctrl-C or SIGTERM what was learned is saved first, and a full disk
    is one sentence that leaves the previous checkpoint and adapter as they were."""
    out_dir = plan.out_dir
    interrupted: KeyboardInterrupt | None = None
    with terminate_as_interrupt(), disk_full_is_an_error(out_dir, trainer):
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
        step = trainer.state.global_step
        if any(c.complete for c in runs.checkpoints(out_dir)):
            then = "`--resume latest` continues from the last checkpoint."
        else:
            then = ("no checkpoint was written yet (every --save-steps steps), so there is "
                    "nothing to resume: --overwrite starts the run again.")
        console.print(f"[yellow]{why}: adapter saved to {out_dir} at step {step}; {then}[/]")
        raise interrupted
    return train_out


def measured_memory(memory: Any, device: str) -> dict[str, float]:
    """The measured peak next to the estimate (and glibc's range top), for the summary."""
    measured = peak_measured(device)
    if measured is None:
        return {}
    out = {"peak_memory_gib": measured / 2**30,
           "peak_memory_estimate_gib": (memory.peak.allocated if device == "cuda"
                                        else memory.peak.total) / 2**30}
    if memory.default_bound is not None and not memory.low_cpu_memory:
        out["peak_memory_bound_gib"] = memory.default_bound / 2**30  # glibc's default
    return out


def base_model_identity(model: Any, cfg: TrainConfig) -> dict[str, Any]:
    """What the adapter was trained on, for qorpo merge's architecture check."""
    from qorpo.model import unwrap

    config = unwrap(model).config
    return {"name_or_path": cfg.model, "model_type": getattr(config, "model_type", None),
            "architectures": list(getattr(config, "architectures", None) or [])}


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


class Claim(NamedTuple):
    cfg: TrainConfig  # output_dir possibly moved aside (the default folder)
    plan: runs.RunPlan


@contextlib.contextmanager
def claim_output_dir(cfg: TrainConfig, fp: dict[str, Any], *,
                     main_process: bool = True) -> Iterator[Claim]:
    """The output folder, locked for this run (one writer per folder; qorpo.lock), and its
    resume point. Taking the lock is also how an unwritable folder is found before the model
    loads. The default folder moves aside rather than being refused: running the demo twice
    gives outputs/demo and outputs/demo-2. On the way out the lock is released, and a folder
    created here that the run never wrote to is removed again."""
    from qorpo.lock import LockedError, acquire

    defaults = {TrainConfig().output_dir, DEMO_OVERRIDES["output_dir"]}
    movable = cfg.output_dir in defaults and cfg.resume is None and not cfg.overwrite
    first, n = cfg, 2
    while True:
        out = runs.resolve_output_dir(cfg)
        try:
            lock = acquire(out, enabled=main_process)
        except LockedError:
            if not movable:
                raise
        else:
            try:
                plan = runs.plan_output_dir(cfg, fp, out)
                break
            except runs.RunError:
                lock.release()
                if not movable:
                    raise
            except BaseException:
                lock.release()
                raise
        while Path(f"{first.output_dir}-{n}").exists():
            n += 1
        cfg = dataclasses.replace(first, output_dir=f"{first.output_dir}-{n}")
        n += 1
    notes = (lock.note,) if lock.note else ()
    if cfg is not first:
        notes += (f"{first.output_dir} holds an earlier run: this one goes to {cfg.output_dir}",)
    try:
        yield Claim(cfg, plan._replace(notes=(*notes, *plan.notes)))
    finally:
        lock.release()


def save_adapter(trainer: Any, out_dir: Path) -> None:
    """The adapter (PEFT format) and tokenizer into out_dir, each file renamed into place so a
    kill never leaves a half-written adapter file; their names join the run's list of what it
    wrote (what --overwrite may remove)."""
    from qorpo.hf import quiet

    staging = out_dir / runs.SAVING
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
    names = sorted(f.name for f in staging.iterdir())
    runs.record_written(out_dir, names)  # listed before they appear: a kill in between is safe
    for name in names:
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


@contextlib.contextmanager
def disk_full_is_an_error(out_dir: Path, trainer: Any) -> Iterator[None]:
    """A full disk (or quota) while checkpointing or saving: the checkpoint or adapter being
    written is removed (the previous ones are untouched: they are complete and marked) and the
    run stops with one sentence naming the folder and the space it needs."""
    import errno

    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        is_main = trainer.is_world_process_zero()
        done = [c for c in runs.checkpoints(out_dir) if c.complete]
        for c in runs.checkpoints(out_dir):
            if not c.complete and is_main:
                shutil.rmtree(c.path, ignore_errors=True)
        if is_main:
            shutil.rmtree(out_dir / runs.SAVING, ignore_errors=True)
        need = folder_bytes(done[-1].path) if done else checkpoint_bytes(trainer.model)
        kept = (f"{done[-1].path.name} is intact: free space, then `--resume latest` "
                "continues from it" if done else "no checkpoint was complete yet")
        raise RunError(f"disk full while writing to {out_dir} at step "
                       f"{trainer.state.global_step}: a checkpoint needs about "
                       f"{need / 2**20:,.0f} MiB free there; {kept}.") from None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def checkpoint_bytes(model: Any) -> int:
    """About what a checkpoint takes: the trainable weights, and AdamW's two moments of them,
    in fp32 (plus the small state files)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3 + 2**20


def planned_steps(cfg: TrainConfig, pairs: int, processes: int = 1) -> int:
    """Optimizer steps, counted as the Trainer counts them: an epoch's last accumulation
    window may be short, and still is a step."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(pairs / (cfg.batch_size * processes))  # micro-batches per epoch
    per_epoch = max(1, math.ceil(batches / cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.epochs))


def build_trainer(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, data: Any,
                  dtype_name: str, device: torch.device, steps: int, console: Console,
                  fp: dict[str, Any], layout: str = "padded", eval_first: bool = True) -> Any:
    from qorpo.data.collate import PairCollator
    from qorpo.trainer import (
        CheckpointCallback,
        MetricsFileCallback,
        ORPOTrainer,
        ORPOTrainingArguments,
    )

    has_eval = data.eval is not None
    optim = cfg.optim
    if optim == "auto":
        optim = "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"
    args = ORPOTrainingArguments(  # (its warm-up leaves the last step a nonzero rate)
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

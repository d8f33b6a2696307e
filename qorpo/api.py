"""`qorpo.train(config)`: setup → build → fit, for the CLI and for notebooks alike."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table

from qorpo.config import TrainConfig
from qorpo.demo import DEMO_PROMPTS
from qorpo.errors import ConfigError, QorpoError
from qorpo.progress import RichProgressCallback

# The demo (no --model and no --data): sized to finish in a few minutes on a 2-core CPU.
# Applied only to options the user left at their defaults.
DEMO_OVERRIDES: dict[str, Any] = dict(
    max_length=192, max_prompt_length=96, learning_rate=5e-4, max_steps=12, batch_size=4,
    grad_accum=2, logging_steps=2, save_steps=1000, output_dir="outputs/demo", warmup_ratio=0.05,
    # 135M parameters fit any machine: recomputing activations would only cost CPU time
    gradient_checkpointing=False,
)


class TrainResult(NamedTuple):
    output_dir: Path  # adapter, tokenizer, qorpo_config.yaml, metrics.jsonl, checkpoints
    metrics: dict[str, float]  # final train metrics and (if any) eval metrics after training
    eval_before: dict[str, float]  # eval metrics before the first step (empty without eval set)
    generations: list[dict[str, str]]  # demo only: prompt, before, after


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
    if cfg.model and Path(cfg.model).expanduser().exists():
        cfg = dataclasses.replace(cfg, model=str(Path(cfg.model).expanduser()))
    demo_run = is_demo(cfg)
    if demo_run:
        console.print("[bold]No --model/--data given: running the offline demo "
                      "(SmolLM2-135M-Instruct on qorpo's demo preference set).[/]")
        cfg = apply_demo_defaults(cfg, console)
    elif cfg.model is None or cfg.data is None:
        raise ConfigError(["give both --model and --data (or neither, for the offline demo)"])

    # ---- setup
    from qorpo.data.collate import PairCollator
    from qorpo.data.prepare import prepare_data
    from qorpo.model import choose_dtype, device_of_process, load_tokenizer

    device = device_of_process()
    dtype = choose_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer, console=console)
    steps = planned_steps(cfg, len(data.train))
    console.print(start_table(cfg, device, dtype, data, steps))
    if dry_run:
        console.print(f"[green]Dry run: {len(data.train)} pairs → {steps} optimizer steps. "
                      "No weights loaded.[/]")
        return TrainResult(Path(cfg.output_dir), {"steps": float(steps)}, {}, [])

    # ---- build
    from qorpo.model import add_lora, load_base_model, parity_check

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(out_dir / "qorpo_config.yaml")
    if cfg.resume is None:  # a fresh run starts a fresh metrics file; a resumed one appends
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same adapter
    with console.status(f"Loading {cfg.model} ({cfg.quant}, {dtype.name})…"):
        model = load_base_model(cfg, dtype.dtype, device)
        model = add_lora(model, cfg, dtype.dtype)
    batch = PairCollator(tokenizer.pad_token_id)([data.train[i]
                                                  for i in range(min(2, len(data.train)))])
    parity = parity_check(model, batch["input_ids"].to(model.device),
                          batch["attention_mask"].to(model.device), dtype.dtype)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(f"Parity check passed: chunked log-probs match the model's logits to "
                  f"{parity.max_abs_diff:.1e} over {parity.tokens} tokens. LoRA: "
                  f"{trainable:,} trainable of {total:,} parameters "
                  f"({100 * trainable / total:.2f}%).")

    # ---- fit
    trainer = build_trainer(cfg, model, tokenizer, data, dtype.name, device, steps, console)
    before: dict[str, float] = {}
    prompts = list(DEMO_PROMPTS) if demo_run else []
    gens_before = [generate(model, tokenizer, p, adapter=False) for p in prompts]
    if data.eval is not None and cfg.resume is None:
        before = trainer.evaluate(metric_key_prefix="eval")
    resume = _resume_arg(cfg, out_dir)
    interrupted = False
    try:
        train_out = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned
        interrupted = True
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, RichProgressCallback):
                cb.close()
    trainer.save_model(str(out_dir))  # adapter (PEFT format) + tokenizer with its template
    # The Trainer also pickles its TrainingArguments there; qorpo_config.yaml says the same in
    # plain text, and a deployable folder should hold no pickle. (Checkpoints keep theirs:
    # resuming needs them.)
    (out_dir / "training_args.bin").unlink(missing_ok=True)
    if interrupted:
        console.print(f"[yellow]Interrupted: adapter saved to {out_dir} at step "
                      f"{trainer.state.global_step}; `--resume latest` continues from the last "
                      "checkpoint.[/]")
        raise KeyboardInterrupt
    metrics = dict(train_out.metrics)
    if data.eval is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    gens = [{"prompt": p, "before": b, "after": generate(model, tokenizer, p, adapter=True)}
            for p, b in zip(prompts, gens_before, strict=True)]
    console.print(summary_table(out_dir, metrics, before, gens))
    return TrainResult(out_dir, metrics, before, gens)


def planned_steps(cfg: TrainConfig, pairs: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_epoch = math.ceil(pairs / (cfg.batch_size * world))
    return max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))


def _resume_arg(cfg: TrainConfig, out_dir: Path) -> str | bool | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        if not any(out_dir.glob("checkpoint-*")):
            raise QorpoError(f"--resume latest: no checkpoint-* folder in {out_dir}")
        return True
    if not Path(cfg.resume).is_dir():
        raise QorpoError(f"--resume {cfg.resume}: not a checkpoint folder")
    return cfg.resume


def build_trainer(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, data: Any,
                  dtype_name: str, device: torch.device, steps: int, console: Console) -> Any:
    from transformers import TrainingArguments

    from qorpo.data.collate import PairCollator
    from qorpo.trainer import MetricsFileCallback, ORPOTrainer

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
        remove_unused_columns=False, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
    )  # gradient checkpointing is set up by qorpo.model (non-reentrant), not by the Trainer
    trainer = ORPOTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=PairCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        beta=cfg.beta, sft_on_prompt=cfg.sft_on_prompt, chunk_size=cfg.chunk_size,
        callbacks=[MetricsFileCallback(Path(cfg.output_dir) / "metrics.jsonl")],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(RichProgressCallback(console, steps))
    return trainer


def generate(model: Any, tokenizer: Any, prompt: str, *, adapter: bool) -> str:
    """Greedy reply to one user turn with the adapter on or off (before/after, one model)."""
    from qorpo.hf import greedy_reply

    with contextlib.nullcontext() if adapter else model.disable_adapter():
        return greedy_reply(model, tokenizer, prompt).text


def start_table(cfg: TrainConfig, device: torch.device, dtype: Any, data: Any,
                steps: int) -> Table:
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
    t.add_row("steps", f"{steps} × {cfg.batch_size} pairs × {cfg.grad_accum} accum, "
                       f"lr {cfg.learning_rate:g} ({cfg.lr_scheduler})")
    t.add_row("output", cfg.output_dir)
    return t


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
    for g in gens:
        t.add_row(f"[bold]prompt[/] {g['prompt']}", "", "")
        t.add_row("  before", "", g["before"])
        t.add_row("  after", "", g["after"])
    t.caption = (f"adapter, tokenizer, qorpo_config.yaml, metrics.jsonl → {out_dir}\n"
                 f"merge: qorpo merge {out_dir} --out {out_dir}-merged")
    return t

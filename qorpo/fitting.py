"""The Trainer of a run and how it runs: build it (arguments, collator, callbacks), run it
(what was learned is saved on Ctrl-C / SIGTERM; a full disk is one sentence), save the adapter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import qorpo.runs as runs
from qorpo.config import TrainConfig
from qorpo.errors import Terminated, terminate_as_interrupt
from qorpo.progress import RichProgressCallback
from qorpo.runs import RunError


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


def attention_cost(model: torch.nn.Module) -> float:
    """qorpo.attention.plan.attention_cost of this (peft-wrapped) model."""
    from qorpo.attention.plan import attention_cost as cost_of
    from qorpo.model import unwrap

    return cost_of(unwrap(model).config)


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

"""`qorpo.train(config)`: setup → build → fit, for the CLI and for notebooks alike."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console

import qorpo.runs as runs
from qorpo.config import TrainConfig
from qorpo.demo import DEMO_PROMPTS
from qorpo.errors import ConfigError
from qorpo.fitting import build_trainer, run_trainer
from qorpo.memory.plan import peak_measured
from qorpo.memory.training import context_notes, train_estimate
from qorpo.progress import (
    dry_run_line,
    estimate_table,
    parity_line,
    print_note,
    start_table,
    summary_table,
)
from qorpo.sysmem import pin_malloc_thresholds, runtime_resident

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


def for_this_run(cfg: TrainConfig, console: Console) -> TrainConfig:
    """The config this run uses: ~ expanded in --model, or the offline demo's model, data and
    sizes when neither --model nor --data is given."""
    if is_demo(cfg):
        console.print("[bold]No --model/--data given: running the offline demo "
                      "(SmolLM2-135M-Instruct on qorpo's demo preference set).[/]")
        return apply_demo_defaults(cfg, console)
    if cfg.model is None or cfg.data is None:
        raise ConfigError(["give both --model and --data (or neither, for the offline demo)"])
    if Path(cfg.model).expanduser().exists():
        return dataclasses.replace(cfg, model=str(Path(cfg.model).expanduser()))
    return cfg


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
    asked = resolve_config(config, **overrides)
    if asked.low_cpu_memory:
        pin_malloc_thresholds()  # before anything large is allocated (see qorpo.sysmem)
    demo = is_demo(asked)
    cfg = for_this_run(asked, console)  # the one config every step below reads
    from qorpo.preflight import check_environment

    check_environment(cfg)  # optimizer, scheduler, loggers, kernels: before anything loads

    # Under torchrun / accelerate launch this joins the process group now: ranks can then take
    # turns (rank 0 prepares the data first, e.g. fills the datasets cache) and only rank 0
    # prints and writes. A single process gets a trivial state.
    from accelerate import PartialState

    from qorpo.model import device_of_process

    device = device_of_process()  # (the kernel asked for was checked against it above)
    procs = PartialState(cpu=device.type == "cpu")  # (on CPU accelerate needs to be told)
    if not procs.is_main_process:
        console = Console(quiet=True)
    fp = runs.fingerprint(cfg)
    with claim_output_dir(cfg, fp, main_process=procs.is_main_process) as claim:
        ready = setup(claim, fp, device, procs, console, dry_run=dry_run, demo=demo)
        if dry_run:
            console.print(dry_run_line(len(ready.data.train), ready.steps))
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
    runtime: Any  # qorpo.sysmem.Resident before the model loaded (CPU), or None


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
    for note in context_notes(cfg, data):
        print_note(console, note)
    # the CPU estimate's runtime term: this process, measured before the model loads
    # (not for a --gpu-memory plan: that estimate is for a GPU, where it is not used)
    on_cpu = device.type == "cpu" and cfg.gpu_memory is None
    runtime = runtime_resident(cfg.quant) if on_cpu else None
    memory = train_estimate(cfg, data, device.type, runtime=runtime)
    if dry_run or (memory.fits is False):
        console.print(estimate_table(memory))
    elif memory.low_cpu_memory and cfg.low_cpu_memory is None:
        print_note(console, memory.note)  # chosen for this run: say so
    if memory.low_cpu_memory and not cfg.low_cpu_memory and not dry_run:
        pin_malloc_thresholds()  # before the model loads (the estimate chose it)
    for note in plan.notes:
        print_note(console, note)
    if plan.resume_from is not None:
        console.print(f"Resuming from {plan.resume_from}")
    return Setup(cfg, plan, fp, device, procs, dtype, tokenizer, data, steps, memory, demo,
                 runtime)


class Built(NamedTuple):
    model: Any  # the peft model
    layout: str  # what really runs: the planned layout, or padded after a fallback
    memory: Any  # the estimate, redone for what really runs after a fallback


def build(ready: Setup, console: Console) -> Built:
    """Load the model, add LoRA, choose the layout and kernel, and check them."""
    from transformers import set_seed

    from qorpo.data.collate import pairs_from_features
    from qorpo.forward import PARITY_PAIRS, parity_check

    cfg, dtype, device, data = ready.cfg, ready.dtype, ready.device, ready.data
    from qorpo.model import add_lora, load_base_model, lora_dropout_for

    set_seed(cfg.seed)  # LoRA init draws from the global RNG: same seed, same adapter
    with console.status(f"Loading {cfg.model} ({cfg.quant}, {dtype.name})…"):
        model = load_base_model(cfg, dtype.dtype, device)
        _, dropout_note = lora_dropout_for(model, cfg)
        model = add_lora(model, cfg, dtype.dtype)
    if dropout_note:
        print_note(console, dropout_note)
    layout, fell_back = choose_layout(model, cfg, device, console)
    memory = ready.memory
    if fell_back:  # the summary compares the measured peak with what really runs
        memory = train_estimate(dataclasses.replace(cfg, low_cpu_memory=memory.low_cpu_memory),
                                data, device.type, runs_as=(layout, None), runtime=ready.runtime)
    first = range(min(PARITY_PAIRS, len(data.train)))  # parity_check uses no more
    pairs = pairs_from_features([data.train[i] for i in first])
    parity = parity_check(model, pairs, layout, ready.tokenizer.pad_token_id or 0, dtype.dtype)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(parity_line(parity, layout, trainable, total))
    return Built(model, layout, memory)


def choose_layout(model: Any, cfg: TrainConfig, device: torch.device,
                  console: Console) -> tuple[str, bool]:
    """The layout and attention kernel this model really runs: (layout, fell_back)."""
    from qorpo.attention.choice import FLEX, agree, choose
    from qorpo.attention.plan import planned
    from qorpo.forward import supports_layout

    layout = cfg.layout
    if layout == "padded":
        return layout, False
    support = supports_layout(model, layout, max_seq_len=cfg.max_length)
    if not support.ok:
        print_note(console, f"prefix sharing off for this model — {support.reason}; using the "
                   "padded layout")
        return "padded", True
    # a kernel that skips the masked blocks (qorpo.attention.choice); the parity check
    # compares it too
    kernel = planned(device.type, layout, cfg.attn_implementation)
    with (console.status("Compiling FlexAttention's kernels and checking them…")
          if kernel == FLEX else contextlib.nullcontext()):
        choice = agree(choose(model, device.type, layout, cfg.attn_implementation), model)
    if choice.note:
        if choice.fell_back:
            print_note(console, choice.note)
        else:
            console.print(choice.note)
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
            print_note(console, note)
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
    # the peak of training, eval and generation (what the estimate models), read before the
    # curves are drawn: importing matplotlib and rendering adds ~60 MB to a CPU process's RSS
    metrics |= measured_memory(built.memory, ready.device.type)
    if procs.is_main_process:
        from qorpo.plot import plot_finished_run

        note = plot_finished_run(out_dir)  # OUT/curves.png; a plot never fails a finished run
        if note:
            print_note(console, note)
        runs.finish(out_dir, trainer.state.global_step)
    console.print(summary_table(out_dir, metrics, before, gens))
    return TrainResult(out_dir, metrics, before, gens, built.memory)


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


def planned_steps(cfg: TrainConfig, pairs: int, processes: int = 1) -> int:
    """Optimizer steps, counted as the Trainer counts them: an epoch's last accumulation
    window may be short, and still is a step."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(pairs / (cfg.batch_size * processes))  # micro-batches per epoch
    per_epoch = max(1, math.ceil(batches / cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.epochs))


def generate(model: Any, tokenizer: Any, prompt: str, *, adapter: bool) -> str:
    """Greedy reply to one user turn with the adapter on or off (before/after, one model)."""
    from qorpo.attention.choice import for_generation
    from qorpo.forward import mixed_precision
    from qorpo.hf import greedy_reply

    # mixed_precision: outside the Trainer a 16-bit QLoRA model needs autocast (fp32 norms)
    with contextlib.nullcontext() if adapter else model.disable_adapter(), \
            for_generation(model), mixed_precision(model):
        return greedy_reply(model, tokenizer, prompt).text

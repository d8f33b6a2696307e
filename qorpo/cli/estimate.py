"""`qorpo estimate`: the memory a run needs, from the model's config.json alone (no data yet)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from qorpo.cli.report import console, run_reporting_errors
from qorpo.errors import ConfigError, ModelError

DEFAULT_MAX_LENGTH = 1024  # as qorpo train's; a model with a shorter context: its context


def estimate_command(
    model: Annotated[str, typer.Option("--model", help="Hub id or local folder: only its "
                                       "config.json is read.")],
    max_length: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Max tokens of prompt + response (default: 1024, or the model's context where "
        "shorter).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Preference pairs per micro-batch.")] = 1,
    gpu_memory: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Plan for a GPU of this size, e.g. 16GB (default: the device found).")] = None,
    device: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="cuda or cpu (default: cuda when --gpu-memory is given or a GPU is found).")] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    low_cpu_memory: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--low-cpu-memory/--no-low-cpu-memory", help="CPU: plan with glibc's thresholds "
        "pinned, or with its default allocator (default: pinned only when the default could "
        "outgrow the RAM, as qorpo train decides).", show_default=False)] = None,
    packing: Annotated[bool, typer.Option("--packing/--no-packing",
                                          help="Layout planned for.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """How much memory a run needs before you have data: worst-case pairs of --max-length."""

    def work() -> None:
        from qorpo.kernels import planned
        from qorpo.memory.plan import (
            assumed_lengths,
            check_context,
            detect_capacity,
            gpu_capacity,
            largest_fits,
            model_shape,
            plan,
        )
        from qorpo.sysmem import allocator

        _check_options(max_length=max_length, batch_size=batch_size, lora_r=lora_r,
                       device=device, gpu_memory=gpu_memory)
        dev = device or ("cuda" if gpu_memory else None)
        if dev is None:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
        capacity = gpu_capacity(gpu_memory) if gpu_memory else detect_capacity(dev)
        shape = _shape_or_error(model_shape, model)
        length = max_length or min(DEFAULT_MAX_LENGTH, shape.context or DEFAULT_MAX_LENGTH)
        check_context(length, shape)
        layout = "packed" if packing else "padded"
        est = plan(shape, assumed_lengths(length) * batch_size, device=dev,
                   batch_size=batch_size, layout=layout, max_length=length,
                   max_prompt_length=length // 2, lora_r=lora_r, capacity=capacity,
                   low_cpu_memory=low_cpu_memory, allocator=allocator(),
                   kernel=planned(dev, layout, None))
        best = largest_fits(shape, capacity, layout=layout, lora_r=lora_r, max_length=length,
                            kernel=planned(dev, layout, None)) if capacity else {}
        if json_out:
            print(json.dumps({"model": model, **est.to_json(), "largest": best}))
            return
        from qorpo.progress import estimate_table

        console.print(estimate_table(est, f"{model}, {batch_size} × {length} tokens"))
        if best:
            context = f" (the model's context: {shape.context:,})" if shape.context else ""
            console.print(f"Largest --max-length at --batch-size 1: "
                          f"{best['max_length_at_batch_1'] or 'none'}{context}; largest "
                          f"--batch-size at --max-length {length}: "
                          f"{best['batch_at_max_length'] or 'none'}.")

    run_reporting_errors(work)


def _check_options(*, max_length: int | None, batch_size: int, lora_r: int, device: str | None,
                   gpu_memory: str | None) -> None:
    """Every bad option at once, as `qorpo train` reports its config (ConfigError)."""
    from qorpo.config import parse_memory_size

    problems = [f"{name}: must be at least 1, got {value}" for name, value in
                (("max_length", max_length), ("batch_size", batch_size), ("lora_r", lora_r))
                if value is not None and value < 1]
    if device is not None and device not in ("cuda", "cpu"):
        problems.append(f"device: {device!r} is not one of cuda, cpu")
    if gpu_memory is not None:
        try:
            parse_memory_size(gpu_memory)
        except ValueError as exc:
            problems.append(f"gpu_memory: {exc}")
    if problems:
        raise ConfigError(problems)


def _shape_or_error(model_shape: Callable[[str], Any], model: str) -> Any:
    path = Path(model).expanduser()
    # A path, not a hub id (those are "name" or "org/name"): say the folder is missing rather
    # than pass the hub library's "Repo id must be in the form…" on.
    if not path.exists() and (path.is_absolute() or model.startswith((".", "~"))
                              or model.count("/") > 1 or "\\" in model):
        raise ModelError(f"--model {model}: no such folder (looked from {Path.cwd()}). Pass a "
                         "model folder or a Hugging Face hub id such as "
                         "HuggingFaceTB/SmolLM2-360M-Instruct.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"--model {model} is not a model folder: config.json is missing (a "
                         "model folder holds config.json, as save_pretrained writes it).")
    try:
        return model_shape(model)
    except (OSError, ValueError) as exc:  # not found, offline, not a config
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if path.exists():
            raise ModelError(f"--model {model}: could not read its config.json ({reason}). A "
                             "model folder holds config.json, as save_pretrained writes "
                             "it.") from None
        raise ModelError(f"--model {model}: could not read its config.json from the Hugging "
                         f"Face hub ({reason}). Check the model id and your network (offline, "
                         "HF_HUB_OFFLINE=1 uses models already in the cache), or pass a local "
                         "model folder.") from None

"""`qorpo estimate`: the memory a run needs, from the model's config.json alone (no data yet)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from qorpo.cli.report import console, run_reporting_errors
from qorpo.errors import ConfigError, ModelError


def estimate_command(
    model: Annotated[str, typer.Option("--model", help="Hub id or local folder: only its "
                                       "config.json is read.")],
    max_length: Annotated[int, typer.Option(help="Max tokens of prompt + response.")] = 1024,
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
            detect_capacity,
            gpu_capacity,
            largest_fits,
            model_shape,
            plan,
        )
        from qorpo.sysmem import allocator

        dev = device or ("cuda" if gpu_memory else None)
        if dev is None:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev not in ("cuda", "cpu"):
            raise ConfigError([f"device: {dev!r} is not one of cuda, cpu"])
        try:
            capacity = gpu_capacity(gpu_memory) if gpu_memory else detect_capacity(dev)
        except ValueError as exc:
            raise ConfigError([f"gpu_memory: {exc}"]) from None
        shape = _shape_or_error(model_shape, model)
        layout = "packed" if packing else "padded"
        est = plan(shape, assumed_lengths(max_length) * batch_size, device=dev,
                   batch_size=batch_size, layout=layout, max_length=max_length,
                   max_prompt_length=max_length // 2, lora_r=lora_r, capacity=capacity,
                   low_cpu_memory=low_cpu_memory, allocator=allocator(),
                   kernel=planned(dev, layout, None))
        best = largest_fits(shape, capacity, layout=layout, lora_r=lora_r,
                            kernel=planned(dev, layout, None)) if capacity else {}
        if json_out:
            print(json.dumps({"model": model, **est.to_json(), "largest": best}))
            return
        from qorpo.progress import estimate_table

        console.print(estimate_table(est, f"{model}, {batch_size} × {max_length} tokens"))
        if best:
            console.print(f"Largest --max-length at --batch-size 1: "
                          f"{best['max_length_at_batch_1'] or 'none'}; largest --batch-size "
                          f"at --max-length 1024: {best['batch_at_1024'] or 'none'}.")

    run_reporting_errors(work)


def _shape_or_error(model_shape: Callable[[str], Any], model: str) -> Any:
    try:
        return model_shape(model)
    except (OSError, ValueError) as exc:  # not found, offline, not a config
        raise ModelError(f"--model {model}: could not read its config.json "
                         f"({str(exc).splitlines()[0][:200]})") from None

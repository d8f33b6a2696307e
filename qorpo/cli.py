"""The `qorpo` command line: `train` (options generated from TrainConfig) and `merge`.

Errors: every user-fixable problem is a QorpoError, caught once here and printed as one or two
lines (exit 1, a bad config 2) — the traceback only with `qorpo --debug` or QORPO_DEBUG=1.
Anything else is a bug: its traceback is printed with a request to report it.
Importing this module (and `qorpo --help`, `qorpo --version`) loads no torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qorpo._version import __version__
from qorpo.config import TrainConfig, parse_memory_size
from qorpo.errors import (
    ConfigError,
    MergeVerificationError,
    QorpoError,
    Terminated,
    terminate_as_interrupt,
)

if TYPE_CHECKING:
    from qorpo.export import GGUFResult
    from qorpo.merging import MergeResult

app = typer.Typer(name="qorpo", add_completion=False, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False,
                  help="Low-memory ORPO preference fine-tuning: 4-bit QLoRA + chunked logits.")
console = Console()
# Errors are not wrapped by rich: paths stay whole in logs, the terminal wraps them itself.
err_console = Console(stderr=True, soft_wrap=True)
ISSUES_URL = "https://github.com/qorpo/qorpo/issues"
T = TypeVar("T")


def _debug() -> bool:
    return os.environ.get("QORPO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run_reporting_errors(action: Callable[[], T]) -> T:
    """Run a command's work; turn user errors into a clean message and an exit code."""
    try:
        with terminate_as_interrupt():
            return action()
    except QorpoError as exc:
        if _debug():
            raise
        rank = _rank_prefix()
        if rank:  # under torchrun/accelerate: say which process failed
            err_console.print(f"{rank}[bold red]error:[/] {escape(str(exc))}")
        elif isinstance(exc, ConfigError):
            err_console.print(f"[red]{escape(str(exc))}[/]")
        elif isinstance(exc, MergeVerificationError):
            err_console.print(f"[bold red]verification failed[/] (nothing written): "
                              f"{escape(str(exc))}")
        else:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    except Terminated:
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        if _peer_failed(exc):  # the process that failed has printed its own message
            err_console.print(f"{_rank_prefix()}stopped: another process of this run failed "
                              "(its error is printed above).")
            raise typer.Exit(1) from None
        err_console.print(f"[bold red]qorpo hit an internal error[/] (a bug, not your mistake). "
                          f"Please report it at {ISSUES_URL} with the command you ran and the "
                          "traceback below.")
        raise


def _rank_prefix() -> str:
    """'[rank 1] ' under torchrun / accelerate launch with several processes, else ''."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return escape(f"[rank {os.environ.get('RANK', '?')}] ")  # not a rich markup tag
    return ""


def _peer_failed(exc: BaseException) -> bool:
    """A collective broke because another process died (gloo: 'Connection closed by peer',
    NCCL: DistBackendError) — a consequence, not the cause."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(exc)
    return (type(exc).__name__ == "DistBackendError" or "closed by peer" in text
            or "remote worker" in text or "NCCL communicator was aborted" in text)


def _show_version(value: bool) -> None:
    if value:
        console.print(f"qorpo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(  # noqa: ARG001 - handled by the eager callback
        "--version", callback=_show_version, is_eager=True,
        help="Print the qorpo version and exit.")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of errors too (same as QORPO_DEBUG=1).")] = False,
) -> None:
    """Low-memory ORPO preference fine-tuning: 4-bit QLoRA + chunked logits."""
    if debug:
        os.environ["QORPO_DEBUG"] = "1"


# ----------------------------------------------------------------------------- train
def _option_for(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and origin is not list and origin is not dict else hint
    if typing.get_origin(base) in (list, dict) or base not in (bool, int, float, str):
        base = str  # lists and mappings are given comma separated
    flag = "--" + f.name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = ",".join(default) if isinstance(default, list) else (
        ",".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else default)
    help_text = f.metadata["help"]
    if f.metadata.get("choices"):
        help_text += f" [{'|'.join(f.metadata['choices'])}]"
    option = typer.Option(None, *decls, help=help_text, rich_help_panel=f.metadata["group"],
                          show_default=str(shown) if shown not in (None, "") else False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[base])  # noqa: UP045 (typer needs Optional)


def _with_config_options(func: Any) -> Any:
    """Give `func(config, dry_run, **options)` one CLI option per TrainConfig field."""
    hints = typing.get_type_hints(TrainConfig)
    own = typing.get_type_hints(func, include_extras=True)  # keep Annotated[…, typer.X]
    params = [p.replace(annotation=own[p.name])
              for p in list(inspect.signature(func).parameters.values())[:-1]]  # drop **options
    params += [_option_for(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


@app.command("train")
@_with_config_options
def train_command(
    config: Annotated[Optional[Path], typer.Argument(  # noqa: UP045
        help="YAML config file; flags given on the command line override it.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Load tokenizer and data, print the format, drop table, "
        "lengths, step count and memory estimate, then exit without loading weights.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="With --dry-run: print only one JSON object (steps, memory "
        "estimate per component, device, fits, headroom).")] = False,
    **options: Any,
) -> None:
    """Train a LoRA adapter with ORPO (no args: the offline demo)."""

    def work() -> None:
        from qorpo.api import train

        if json_out and not dry_run:
            raise ConfigError(["--json goes with --dry-run"])
        result = train(TrainConfig.load(config, options), dry_run=dry_run,
                       console=Console(quiet=True) if json_out else console)
        if json_out:
            print(json.dumps({"steps": int(result.metrics["steps"]),
                              "memory": result.memory.to_json()}))

    run_reporting_errors(work)


@app.command("estimate")
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
    packing: Annotated[bool, typer.Option("--packing/--no-prefix-sharing",
                                          help="Layout planned for.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """How much memory a run needs before you have data: worst-case pairs of --max-length."""

    def work() -> None:
        from qorpo.memory.plan import (
            Capacity,
            assumed_lengths,
            detect_capacity,
            largest_fits,
            model_shape,
            plan,
        )

        dev = device or ("cuda" if gpu_memory else None)
        if dev is None:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev not in ("cuda", "cpu"):
            raise ConfigError([f"device: {dev!r} is not one of cuda, cpu"])
        try:
            capacity = (Capacity("cuda", parse_memory_size(gpu_memory) * 0.94,
                                 f"--gpu-memory {gpu_memory} (94% usable)")
                        if gpu_memory else detect_capacity(dev))
        except ValueError as exc:
            raise ConfigError([f"gpu_memory: {exc}"]) from None
        shape = _shape_or_error(model_shape, model)
        layout = "packed" if packing else "padded"
        est = plan(shape, assumed_lengths(max_length) * batch_size, device=dev,
                   batch_size=batch_size, layout=layout, max_length=max_length,
                   max_prompt_length=max_length // 2, lora_r=lora_r, capacity=capacity)
        best = largest_fits(shape, capacity, layout=layout, lora_r=lora_r) if capacity else {}
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
        from qorpo.errors import ModelError

        raise ModelError(f"--model {model}: could not read its config.json "
                         f"({str(exc).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------- merge
class DType(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Into(str, Enum):
    original = "original"
    dequantized = "dequantized"


class Method(str, Enum):
    stream = "stream"
    full = "full"


class GGUFType(str, Enum):
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


@app.command("merge")
def merge_command(
    adapter_dir: Annotated[
        Path,
        typer.Argument(help="Adapter folder (adapter_config.json + adapter_model.safetensors)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the merged model.")],
    base: Annotated[
        str | None,
        typer.Option(help="Base model folder or hub id (default: the adapter's base model)."),
    ] = None,
    dtype: Annotated[
        DType, typer.Option(help="Output dtype; auto = the base config's dtype (else fp32).")
    ] = DType.auto,
    into: Annotated[
        Into,
        typer.Option(
            help="original: add the delta to the base weights. dequantized: to the NF4 "
            "round-tripped weights the 4-bit training actually saw."
        ),
    ] = Into.original,
    method: Annotated[
        Method,
        typer.Option(help="stream: shard by shard, low RAM. full: load + peft merge_and_unload."),
    ] = Method.stream,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    gguf: Annotated[
        GGUFType | None,
        typer.Option(
            help="Also write a GGUF for llama.cpp, Ollama and LM Studio (OUT/<OUT's name>-<type>"
            ".gguf) and an Ollama Modelfile; Llama, Mistral, Qwen2 with byte-level BPE "
            "tokenizers; verified with the merge.",
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        bool | None,
        typer.Option(
            "--verify/--no-verify",
            help="Compare logits of the merged model with base + adapter, and of the GGUF with "
            "the merged model (default: each when it fits comfortably in RAM).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output folder.")
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Allow .bin (pickle) weights (weights_only=True)."),
    ] = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a plain transformers model."""

    def work() -> MergeResult:
        from qorpo.merging import merge

        try:
            return merge(adapter_dir, out, base=base, dtype=dtype.value, into=into.value,
                         method=method.value, max_shard_size=max_shard_size, verify=verify,
                         force=force, allow_pickle=allow_pickle, progress=True,
                         gguf=gguf.value if gguf is not None else None)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the staging folder is already gone
            err_console.print(f"[yellow]Interrupted: nothing was written to {escape(str(out))}."
                              "[/]")
            raise

    result = run_reporting_errors(work)
    console.print(_merge_table(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def _merge_table(result: MergeResult) -> Table:
    table = Table(title=f"merged -> {escape(str(result.out_dir))}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "base": str(result.base),
        "adapter": str(result.adapter_dir),
        "method / into / dtype": f"{result.method} / {result.into} / {result.dtype}",
        "weights": f"{len(result.weight_files)} file(s), {result.total_bytes / 1e6:,.1f} MB",
        "LoRA modules merged": str(result.merged_modules),
        "tensors from adapter": str(result.replaced_tensors),
        "untied": ", ".join(result.untied) or "-",
        "tokenizer from": str(result.tokenizer_source),
        "time": f"{result.seconds:.1f} s",
    }
    report = result.verification
    if report is not None:
        rows["verified vs"] = report.reference
        rows["logit gap"] = f"{report.gap} (tolerance {report.tolerance:.3g})"
        if report.compute_noise:
            rows[f"{report.dtype} compute noise"] = f"{report.compute_noise:.3g}"
        if report.adapter_effect is not None:
            rows["adapter effect"] = f"max|Δ|={report.adapter_effect.max_abs:.3g}"
        if report.other_gap is not None:
            rows[f"vs {report.other_reference}"] = str(report.other_gap)
    else:
        rows["verified"] = "no"
    if result.gguf is not None:
        rows |= _gguf_rows(result.gguf)
    for key, value in rows.items():
        table.add_row(key, escape(value))
    return table


def _gguf_rows(gguf: GGUFResult) -> dict[str, str]:
    rows = {
        "GGUF": f"{gguf.path.name} ({gguf.out_type}, {gguf.arch}, {gguf.tensors} tensors, "
        f"{gguf.bytes / 1e6:,.1f} MB)",
        "Modelfile": gguf.modelfile.name,
    }
    report = gguf.verification
    if report is None:
        rows["GGUF verified"] = "no"
        return rows
    rows["GGUF vs merged"] = (f"max|Δ|={report.max_abs:.3g} (tolerance {report.tolerance:.3g}, "
                              f"{report.out_type} rounding alone {report.rounding_gap:.3g})")
    rows["GGUF greedy"] = (f"agreement={report.greedy_agreement:.1%}, generation "
                           f"{'agrees' if report.generation_agrees else 'differs'}")
    rows["GGUF tokenizer"] = f"{report.tokens_checked} token ids identical, template + eos/eot ok"
    return rows


@app.command("version")
def version_command() -> None:
    """Print the qorpo version."""
    console.print(f"qorpo {__version__}")


def main() -> None:
    import logging

    # bitsandbytes warns at import that an optional CPU inference kernel (`kernels` package) is
    # missing; qorpo never uses that path (see qorpo.quant.keep_4bit_differentiable).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    app(prog_name="qorpo")


if __name__ == "__main__":
    sys.exit(main())

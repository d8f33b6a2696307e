"""`qorpo merge`: options (torch-free until the command runs) and the result table."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from qorpo.cli.report import console, err_console, run_reporting_errors

if TYPE_CHECKING:
    from qorpo.export import GGUFResult
    from qorpo.merging import MergeResult

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
        bool,
        typer.Option(
            "--force",
            help="Replace an existing output folder, if an earlier qorpo merge wrote it (or it "
            "is empty); any other folder is refused.",
        ),
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Allow .bin (pickle) weights (weights_only=True)."),
    ] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Run the base model's (or tokenizer's) own Python code (config auto_map); "
            "without it such a base is refused and none of its code runs.",
        ),
    ] = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a plain transformers model."""

    def work() -> MergeResult:
        from qorpo.merging import merge

        try:
            return merge(adapter_dir, out, base=base, dtype=dtype.value, into=into.value,
                         method=method.value, max_shard_size=max_shard_size, verify=verify,
                         force=force, allow_pickle=allow_pickle, progress=True,
                         gguf=gguf.value if gguf is not None else None,
                         trust_remote_code=trust_remote_code)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the staging folder is already gone
            err_console.print(f"[yellow]Interrupted: nothing was written to {escape(str(out))}."
                              "[/]")
            raise

    result = run_reporting_errors(work)
    console.print(_merge_table(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")


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

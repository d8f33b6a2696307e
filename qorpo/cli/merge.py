"""`qorpo merge`: one option per MergeOptions field, generated (flags, API and docs share it;
torch-free until the command runs), and the result table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from qorpo.cli.options import with_options
from qorpo.cli.report import console, err_console, run_reporting_errors
from qorpo.merging.options import MergeConfig, MergeOptions

if TYPE_CHECKING:
    from qorpo.export import GGUFResult
    from qorpo.merging import MergeResult

_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(MergeConfig)}


@with_options(MergeOptions)
def merge_command(
    adapter_dir: Annotated[Path, typer.Argument(help=_HELP["adapter"])],
    out: Annotated[Path, typer.Option("--out", "-o", help=_HELP["out"])],
    **options: Any,
) -> None:
    """Merge a LoRA adapter into its base model and save a plain transformers model."""

    def work() -> MergeResult:
        from qorpo.merging import merge

        given = {k: v for k, v in options.items() if v is not None}
        config = MergeConfig.from_dict({"adapter": str(adapter_dir), "out": str(out), **given},
                                       source="options")
        try:
            return merge(config, progress=True)
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

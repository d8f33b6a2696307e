"""`qorpo plot`: training curves of finished or live runs into a PNG (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from qorpo.cli.report import console, run_reporting_errors


def plot_command(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folders (qorpo train's --output-dir), finished or still training; several "
        "are overlaid.")],
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045 (typer needs Optional)
        "--out", "-o", help="PNG to write (default: RUN/curves.png for one run, ./curves.png "
        "for several).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out even if it is not a qorpo plot.")] = False,
) -> None:
    """Plot loss, NLL, L_OR, reward accuracy and margin (train and eval) per optimizer step."""

    def work() -> Path:
        from qorpo.plot import write_curves

        return write_curves(runs, out, force=force)

    path = run_reporting_errors(work)
    console.print(f"curves → {escape(str(path))}")

"""The `qorpo` application: global options (--version, --debug) and the commands registered."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from qorpo._version import __version__
from qorpo.cli.estimate import estimate_command
from qorpo.cli.merge import merge_command
from qorpo.cli.report import console
from qorpo.cli.train import train_command

app = typer.Typer(name="qorpo", add_completion=False, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False,
                  help="Low-memory ORPO preference fine-tuning: 4-bit QLoRA + chunked logits.")


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


app.command("train")(train_command)
app.command("estimate")(estimate_command)
app.command("merge")(merge_command)


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

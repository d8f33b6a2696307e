"""The `qorpo` application: global options (--version, --debug) and the commands registered."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup, TyperOption

from qorpo._version import __version__
from qorpo.cli.estimate import estimate_command
from qorpo.cli.eval import eval_command
from qorpo.cli.merge import merge_command
from qorpo.cli.plot import plot_command
from qorpo.cli.report import console
from qorpo.cli.train import train_command

LONG_WORD = 28  # rich cuts a word longer than the help column ("…"); ~38 wide at 80
LONG_CHOICES = 12  # a longer <a|b|c> is folded inside the type column: listed in the help


@contextlib.contextmanager
def _readable_at_80_columns(params: Sequence[Any]) -> Iterator[None]:
    """While --help renders: an on/off flag names its --no- form in its help text rather than
    in a column of its own (two ~25-character names left the help text 7 columns at 80, and
    the names were cut), a flag shows no `<bool>` (it takes no value), and a long
    comma-separated example in a help text may wrap after its commas."""
    saved = []
    for p in params:
        if not isinstance(p, TyperOption):
            continue
        saved.append((p, p.secondary_opts, p.metavar, p.help))
        if p.help:
            p.help = " ".join(re.sub(r",(?=\S)", ", ", w) if len(w) > LONG_WORD else w
                              for w in p.help.split(" "))
        choices = [str(getattr(c, "value", c)) for c in getattr(
            getattr(p, "type_descriptor", None), "choices", None) or ()]
        if p.show_choices and len("|".join(choices)) > LONG_CHOICES:  # in the help text
            p.metavar = "<choice>"
            listed = "|".join(choices)
            listed = listed if len(listed) <= LONG_WORD else " | ".join(choices)
            p.help = f"{p.help or ''} {escape(f'[{listed}]')}".lstrip()
        if p.is_flag:
            if p.secondary_opts:
                p.help = f"{p.help or ''} Off: {', '.join(p.secondary_opts)}.".lstrip()
                p.secondary_opts = []
            p.metavar = ""
    try:
        yield
    finally:
        for p, secondary, metavar, help_text in saved:
            p.secondary_opts, p.metavar, p.help = secondary, metavar, help_text


class QorpoCommand(TyperCommand):
    """A command whose --help reads well at 80 columns (see _readable_at_80_columns)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with _readable_at_80_columns(self.get_params(ctx)):
            super().format_help(ctx, formatter)


class QorpoGroup(TyperGroup):
    def format_help(self, ctx: Any, formatter: Any) -> None:
        with _readable_at_80_columns(self.get_params(ctx)):
            super().format_help(ctx, formatter)


app = typer.Typer(name="qorpo", cls=QorpoGroup, add_completion=False, rich_markup_mode="rich",
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


app.command("train", cls=QorpoCommand)(train_command)
app.command("estimate", cls=QorpoCommand)(estimate_command)
app.command("merge", cls=QorpoCommand)(merge_command)
app.command("eval", cls=QorpoCommand)(eval_command)
app.command("plot", cls=QorpoCommand)(plot_command)


@app.command("version", cls=QorpoCommand)
def version_command() -> None:
    """Print the qorpo version."""
    console.print(f"qorpo {__version__}")


def main() -> None:
    import logging

    # bitsandbytes warns at import that an optional CPU inference kernel (`kernels` package) is
    # missing; qorpo never uses that path (see qorpo.quant.keep_4bit_differentiable).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    app(prog_name="qorpo")

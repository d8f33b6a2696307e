"""`qorpo` command line. Thin: the `train` options are generated from TrainConfig's fields."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from qorpo import __version__
from qorpo.config import ConfigError, TrainConfig

app = typer.Typer(name="qorpo", add_completion=False, rich_markup_mode="rich",
                  help="Low-memory ORPO preference fine-tuning: 4-bit QLoRA + chunked logits.")
console = Console()


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
        "lengths and step count, then exit without loading weights.")] = False,
    **options: Any,
) -> None:
    """Train a LoRA adapter with ORPO (no args: the offline demo)."""
    from qorpo.api import train

    try:
        cfg = TrainConfig.load(config, options)
        train(cfg, dry_run=dry_run, console=console)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # known failure modes print cleanly; others keep the traceback
        if type(exc).__name__ in _CLEAN_ERRORS:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        raise


# Our own error types whose messages already say what is wrong and what to do.
_CLEAN_ERRORS = {"DataError", "ModelError", "NonFiniteLossError", "DemoUnavailableError",
                 "FileNotFoundError", "MergeError", "MergeVerificationError"}


def _register_merge() -> None:
    from qorpo.cli_merge import merge_command

    app.command("merge")(merge_command)


_register_merge()


@app.command("version")
def version_command() -> None:
    """Print the qorpo version."""
    console.print(f"qorpo {__version__}")


def main() -> None:
    import logging

    # bitsandbytes warns at import that an optional CPU inference kernel (`kernels` package) is
    # missing; qorpo never uses that path (see qorpo.model.keep_4bit_differentiable).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    app(prog_name="qorpo")


if __name__ == "__main__":
    sys.exit(main())

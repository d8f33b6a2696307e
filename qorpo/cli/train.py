"""`qorpo train`: one option per TrainConfig field, generated (flags, YAML and API share it)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from qorpo.cli.report import console, run_reporting_errors
from qorpo.config import TrainConfig
from qorpo.errors import ConfigError


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

"""`qorpo train`: one option per TrainConfig field, generated (flags, YAML and API share it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from qorpo.cli.options import with_options
from qorpo.cli.report import console, run_reporting_errors
from qorpo.config import TrainConfig
from qorpo.errors import ConfigError


@with_options(TrainConfig)
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

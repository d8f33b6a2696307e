"""`qorpo eval`: options (torch-free until the command runs), the tables or one JSON object."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from qorpo.cli.report import console, run_reporting_errors
from qorpo.config import TrainConfig

if TYPE_CHECKING:
    from qorpo.evaluation import EvalResult

_SCORING = "Scoring (default: the run's own settings)"
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _scoring(name: str, note: str = "") -> Any:
    """An option of the scoring panel, with TrainConfig's help for the field."""
    return typer.Option(rich_help_panel=_SCORING, help=_FIELDS[name].metadata["help"] + note)


def eval_command(
    model: Annotated[str, typer.Argument(
        help="Base model (hub id or folder), a merged folder, or a run / checkpoint folder "
        "(then its base is scored next to it).")],
    adapter: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 (typer)
        "--adapter", "-a", help="A run folder or checkpoint-N folder to score on MODEL; "
        "repeat for several (the base is loaded once).")] = None,
    data: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Preference pairs: a file or hub dataset (default: the run's eval set).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a hub dataset.")] = None,  # noqa: UP045
    subset: Annotated[Optional[str], typer.Option(help="Hub dataset config.")] = None,  # noqa: UP045
    eval_fraction: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="Score the held-out fraction of --data that `qorpo train --eval-fraction` "
        "holds out (same --seed).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the held-out split.")] = None,  # noqa: UP045
    columns: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Column mapping, e.g. prompt=question,chosen=good,rejected=bad.")] = None,
    max_samples: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Score at most this many pairs (the first ones).")] = None,
    generate: Annotated[int, typer.Option(
        help="Greedy replies to the first N prompts, from every model, side by side.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generated reply.")] = 64,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print only one JSON object (metrics, differences, replies).")] = False,
    max_length: Annotated[Optional[int], _scoring("max_length")] = None,  # noqa: UP045
    max_prompt_length: Annotated[Optional[int], _scoring("max_prompt_length")] = None,  # noqa: UP045
    min_response_tokens: Annotated[Optional[int], _scoring("min_response_tokens")] = None,  # noqa: UP045
    chat_template: Annotated[Optional[str], _scoring("chat_template")] = None,  # noqa: UP045
    beta: Annotated[Optional[float], _scoring("beta")] = None,  # noqa: UP045
    quant: Annotated[Optional[str], _scoring(  # noqa: UP045
        "quant", " 4bit, 8bit or none (a merged model as deployed: none).")] = None,
    dtype: Annotated[Optional[str], _scoring("dtype")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], _scoring("batch_size")] = None,  # noqa: UP045
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Run the model's own code (never without this flag).")
    ] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Allow .bin (pickle) weights.")] = False,
) -> None:
    """Score preference pairs with the base and each adapter: reward accuracy, margin, log odds,
    NLL and ORPO loss, exactly as training computes them, side by side."""
    settings: dict[str, Any] = dict(
        split=split, subset=subset, eval_fraction=eval_fraction, seed=seed, columns=columns,
        max_length=max_length, max_prompt_length=max_prompt_length,
        min_response_tokens=min_response_tokens, chat_template=chat_template, beta=beta,
        quant=quant, dtype=dtype, batch_size=batch_size)
    settings = {k: v for k, v in settings.items() if v is not None}

    def work() -> EvalResult:
        from qorpo.evaluation import evaluate

        return evaluate(model, adapter or [], data=data, max_samples=max_samples,
                        generate=generate, max_new_tokens=max_new_tokens,
                        console=Console(quiet=True) if json_out else console,
                        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                        **settings)

    result = run_reporting_errors(work)
    if json_out:
        print(json.dumps(result.to_json()))
        return
    from qorpo.evaluation import eval_table, generations_table

    console.print(eval_table(result))
    if result.generations:
        console.print(generations_table(result))

"""CLI options generated from an option dataclass (qorpo.options): one flag per field, so the
command, its YAML keys, the Python API and the docs cannot drift apart."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import typer
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])


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
        help_text += escape(f" [{'|'.join(f.metadata['choices'])}]")  # not a rich style tag
    # None: "not given", so a YAML file's value or the dataclass default applies
    option = typer.Option(None, *decls, help=help_text, rich_help_panel=f.metadata["group"],
                          show_default=str(shown) if shown not in (None, "") else False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[base])  # noqa: UP045 (typer needs Optional)


def with_options(cls: type) -> Callable[[F], F]:
    """Give `func(<its own parameters>, **options)` one CLI option per field of `cls`; the
    options given arrive in `**options` (None when not given)."""

    def decorate(func: F) -> F:
        hints = typing.get_type_hints(cls)
        own = typing.get_type_hints(func, include_extras=True)  # keep Annotated[…, typer.X]
        params = [p.replace(annotation=own[p.name])
                  for p in list(inspect.signature(func).parameters.values())[:-1]]  # **options
        params += [_option_for(f, hints[f.name]) for f in dataclasses.fields(cls)]
        func.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        func.__annotations__ = {p.name: p.annotation for p in params}
        return func

    return decorate

"""Config dataclasses that are CLI flags, YAML keys, API keywords and docs at once (torch-free).

A field made with `option(...)` carries its help text, option group and choices; `Options`
subclasses (TrainConfig, and the merge and estimate configs) get `from_dict` (strings and YAML
values parsed to the field's type, unknown keys with a "did you mean", every problem listed in
one ConfigError), qorpo.cli.options turns their fields into Typer options, and
scripts/gen_docs.py into the docs' tables.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, TypeVar

from qorpo.errors import ConfigError

__all__ = ["Options", "choice_problem", "choice_problems", "coerce", "field_table", "option"]

T = TypeVar("T", bound="Options")


def option(default: Any, group: str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text, group and choices (the CLI and docs read them)."""
    meta = {"group": group, "help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choice_problem(f: dataclasses.Field, value: Any) -> str | None:
    """A value that is not one of the field's choices (None passes where None is the field's
    default: the option was not set)."""
    choices = f.metadata.get("choices")
    if not choices or (value is None and f.default is None) or value in choices:
        return None
    return f"{f.name}: {value!r} is not one of {', '.join(choices)}"


def choice_problems(obj: Any) -> list[str]:
    """Every field of an option dataclass whose value is not one of its choices."""
    found = (choice_problem(f, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return [p for p in found if p]


class Options:
    """Mixin for option dataclasses: build from plain values, validated once."""

    def validate(self: T) -> T:
        """Subclasses check their fields and raise one ConfigError listing every problem."""
        return self

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
        """Build from plain values (YAML or CLI). Strings are parsed to the field's type."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in names:
                close = [n for n in names if n.startswith(name[:4])]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                problems.append(f"{source}: unknown key {key!r}{hint}")
                continue
            try:
                kwargs[name] = coerce(hints[name], raw)
            except (TypeError, ValueError) as exc:
                problems.append(f"{source}: {key}: {exc}")
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs).validate()


def coerce(tp: Any, raw: Any) -> Any:
    """Turn a YAML value or a CLI string into the (resolved) field type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            return None
        return coerce(args[0], raw)
    if origin is list:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"expected a list or comma-separated string, got {raw!r}")
        return [str(i).strip() for i in items if str(i).strip()]
    if origin is dict:
        if isinstance(raw, str):
            pairs = [p for p in raw.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ValueError(f"expected key=value pairs separated by commas, got {raw!r}")
            raw = dict(p.split("=", 1) for p in pairs)
        if not isinstance(raw, dict):
            raise TypeError(f"expected a mapping, got {raw!r}")
        return {str(k).strip(): str(v).strip() for k, v in raw.items()}
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"expected an integer, got {raw!r}")
        return int(raw)
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        return float(raw)
    if tp is str:
        if not isinstance(raw, (str, int, float)):
            raise TypeError(f"expected a string, got {raw!r}")
        return str(raw)
    raise TypeError(f"unsupported field type {tp}")


def field_table(cls: type) -> list[dict[str, str]]:
    """Rows (name, flag, group, type, default, help) for docs and `--help`."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    rows = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        plain = typing.get_origin(hint) is None and isinstance(hint, type)
        tp = hint.__name__ if plain else str(hint).replace("typing.", "")
        choices = f.metadata.get("choices")
        rows.append({
            "name": f.name,
            "flag": "--" + f.name.replace("_", "-"),
            "group": f.metadata["group"],
            "type": " | ".join(choices) if choices else tp,
            "default": repr(getattr(defaults, f.name)),
            "help": f.metadata["help"],
        })
    return rows

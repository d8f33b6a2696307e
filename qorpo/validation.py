"""The rules a TrainConfig's values must follow (`TrainConfig.validate` lists every broken one).

Torch-free and free of qorpo.config (which imports this module): the CLI's `--help` loads it.
What needs transformers or the installed packages is checked in qorpo.preflight instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any

from qorpo.options import choice_problem

# Counts that must be at least 1 (None, where a field allows it, means "not set").
POSITIVE = ("lora_r", "max_length", "max_prompt_length", "min_response_tokens", "chunk_size",
            "batch_size", "grad_accum", "logging_steps", "save_steps", "eval_steps",
            "save_total_limit", "max_samples")
_KINDS: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number",
                          str: "a string", list: "a list of strings",
                          dict: "a mapping of strings to strings"}
_MEMORY_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*", re.IGNORECASE)


def memory_size_problems(name: str, text: str | None) -> list[str]:
    """[] if `text` is unset or a memory size parse_memory_size reads, else the problem."""
    if text is None:
        return []
    try:
        parse_memory_size(text)
    except ValueError as exc:
        return [f"{name}: {exc}"]
    return []


def parse_memory_size(text: str) -> float:
    """'16GB' / '15.5 GiB' / '24g' / '8000MB' -> bytes. GB is read as GiB: cards are sold that
    way (a "16 GB" T4 has 16 GiB)."""
    m = _MEMORY_SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a memory size: write e.g. 16GB or 24GB")
    unit = (m.group(2) or "gb").lower()
    size = float(m.group(1)) * (2**20 if unit.startswith("m") else 2**30)
    if size <= 0:  # (the pattern admits no sign: this is 0, 0.0, 0MB...)
        raise ValueError(f"{text!r} is no memory at all: give the GPU's size, e.g. 16GB or 24GB")
    return size


def config_problems(cfg: Any) -> list[str]:
    """Every problem of the TrainConfig `cfg`, one line each; [] when it is valid. Values of
    the wrong type are reported alone (the other rules compare values)."""
    return _type_problems(cfg) or [*_value_problems(cfg), *_length_problems(cfg)]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_problems(cfg: Any) -> list[str]:
    """Values of the wrong type. YAML and CLI values are parsed (qorpo.config.coerce); a
    TrainConfig built in Python (or `dataclasses.replace`d by the API) is not, and e.g. a
    `trust_remote_code=None` would let transformers ask on stdin whether to run a model's code."""
    hints = _hints(type(cfg))
    problems = []
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = typing.get_args(tp) if union else (tp,)
        if value is None and type(None) in args:
            continue
        base = next(a for a in args if a is not type(None))
        kind = typing.get_origin(base) or base
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind in (int, float):
            ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(
                value, bool)
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif kind is dict:
            ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in value.items())
        else:
            ok = isinstance(value, kind)
        if not ok:
            empty = " or empty" if type(None) in args else ""
            problems.append(f"{f.name}: expected {_KINDS[kind]}{empty}, got {value!r}")
    return problems


def _value_problems(cfg: Any) -> list[str]:
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if wrong := choice_problem(f, value):
            problems.append(wrong)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{f.name}: must be a finite number, got {value}")
    for name in POSITIVE:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            problems.append(f"{name}: must be >= 1, got {value}"
                            + (" (leave it empty for no limit)"
                               if name == "save_total_limit" else ""))
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        problems.append(f"max_steps: must be >= 1, or -1 to train for --epochs, got "
                        f"{cfg.max_steps}")
    if not 0 <= cfg.seed < 2**32:  # numpy's and torch's seeds are unsigned 32-bit
        problems.append(f"seed: must be in 0 .. {2**32 - 1}, got {cfg.seed}")
    problems += memory_size_problems("gpu_memory", cfg.gpu_memory)
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        problems.append("weight_decay and max_grad_norm: must be >= 0")
    for name in ("lora_dropout", "eval_fraction", "warmup_ratio"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            problems.append(f"{name}: must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("beta", "learning_rate", "lora_alpha", "epochs"):
        if not getattr(cfg, name) > 0:
            problems.append(f"{name}: must be > 0, got {getattr(cfg, name)}")
    return problems + _name_problems(cfg)


def _name_problems(cfg: Any) -> list[str]:
    problems = []
    if not cfg.lora_targets:
        problems.append("lora_targets: give 'all-linear' or at least one module name")
    elif "all-linear" in cfg.lora_targets and len(cfg.lora_targets) > 1:
        problems.append(f"lora_targets: {','.join(cfg.lora_targets)}: all-linear already "
                        "adapts every linear layer; give it alone, or module names only")
    bad_cols = set(cfg.columns) - {"prompt", "chosen", "rejected", "system"}
    if bad_cols:
        problems.append(f"columns: unknown keys {sorted(bad_cols)}; allowed: prompt, "
                        "chosen, rejected, system")
    known_reports = {"none", "tensorboard", "wandb", "all"}
    if set(cfg.report_to) - known_reports:
        problems.append(f"report_to: {cfg.report_to} — allowed: {sorted(known_reports)}")
    return problems


def _length_problems(cfg: Any) -> list[str]:
    """max_length, max_prompt_length, min_response_tokens together. A prompt is cut to the
    (resolved) max_prompt_length and a row is dropped when fewer than min_response_tokens are
    left for its responses: the three must leave room for both, or every row with a long
    prompt is cut and then dropped anyway (qorpo.data.prepare._fit)."""
    length, given, least = cfg.max_length, cfg.max_prompt_length, cfg.min_response_tokens
    if any(v is not None and v < 1 for v in (length, given, least)):
        return []  # (reported as such)
    if given is not None and given >= length:
        return [f"max_prompt_length ({given}) must be < max_length ({length}) to leave room "
                "for the response: lower --max-prompt-length or raise --max-length"]
    prompt = cfg.resolved_max_prompt_length
    room = length - prompt
    if least <= room:
        return []
    need = prompt + least if given is not None else 2 * least - 1  # ceil(L / 2) >= least
    raise_it = f"raise --max-length to at least {need}"
    lower = f"lower --min-response-tokens to {room} or less" if room >= 1 else ""
    if least >= length:
        fixes = " or ".join(f for f in (raise_it, lower) if f)
        return [f"max_length ({length}) leaves no room for a prompt with min_response_tokens "
                f"{least}: {fixes}"]
    if given is None:
        return [f"max_length ({length}) cuts prompts to {prompt} tokens (max_prompt_length "
                f"defaults to half of it), which leaves {room} for the response, fewer than "
                f"min_response_tokens {least}: every row with a cut prompt would be dropped. "
                f"{raise_it.capitalize()}, {lower}, or set --max-prompt-length to "
                f"{length - least} or less"]
    return [f"max_prompt_length ({given}) + min_response_tokens ({least}) exceed max_length "
            f"({length}): a prompt cut to {given} tokens leaves {room} for the response, so "
            f"every row with a cut prompt would be dropped. Lower --max-prompt-length to "
            f"{length - least}, {lower} or {raise_it}"]

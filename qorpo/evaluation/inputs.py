"""What `qorpo eval` scores: the base model (a hub id, a model folder or a merged folder), the
adapters (run folders or checkpoint-N folders), and the settings they were trained with.

A run folder holds `qorpo_config.yaml`; a checkpoint's run is its parent folder. The eval
settings default to the first adapter's run (same template, truncation, β, layout), so the
numbers are the ones the trainer's own eval reports; flags override them. Code shipped with a
model runs only with --trust-remote-code, and pickle weights load only with --allow-pickle,
whatever the run's config said.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from qorpo.config import TrainConfig
from qorpo.errors import ConfigError, QorpoError
from qorpo.runs import CONFIG_FILE, RUN_FILE, checkpoints

ADAPTER_CONFIG = "adapter_config.json"
# Settings of the run that decide what is scored and how: kept from the run, unless a flag says
# otherwise. (Everything else of TrainConfig is irrelevant to scoring.)
SCORING = ("max_length", "max_prompt_length", "min_response_tokens", "chat_template", "beta",
           "sft_on_prompt", "quant", "dtype", "prefix_sharing", "packing", "chunk_size",
           "batch_size", "attn_implementation", "revision")
DATA = ("data", "split", "subset", "eval_data", "eval_split", "eval_fraction", "columns",
        "max_samples", "seed")


class EvalInputError(QorpoError):
    """A model, adapter or data argument of `qorpo eval` that cannot be used as given."""


class Adapter(NamedTuple):
    name: str  # as the user gave it: the table's column title
    path: Path  # folder with adapter_config.json
    run: Path | None  # the run folder whose qorpo_config.yaml describes it


class EvalInputs(NamedTuple):
    cfg: TrainConfig  # model = the base; data = what is scored (see scored_set)
    base_name: str
    adapters: list[Adapter]
    notes: list[str]


def adapter_of(ref: str | Path, what: str = "--adapter") -> Adapter:
    """A run folder or a checkpoint folder with a saved adapter; else a clear error."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise EvalInputError(f"{what} {ref}: no such folder; give a run folder (qorpo train's "
                             "--output-dir) or one of its checkpoint-N folders.")
    if not (path / ADAPTER_CONFIG).is_file():
        done = [c.path.name for c in checkpoints(path) if c.complete]
        hint = (f" Its checkpoints: {', '.join(done)} — pass one of them." if done else
                " Give a run folder (qorpo train's --output-dir) or one of its checkpoint-N "
                "folders.")
        raise EvalInputError(f"{what} {ref} holds no adapter ({ADAPTER_CONFIG} is missing)."
                             + hint)
    parent = path.parent
    marked = [c for c in checkpoints(parent) if c.path.resolve() == path.resolve()]
    if marked and not marked[0].complete:
        raise EvalInputError(f"{what} {ref}: this checkpoint was cut short or its files do not "
                             "match its marker (qorpo_checkpoint.json); use another checkpoint "
                             "or the run folder.")
    run = path if (path / CONFIG_FILE).is_file() else (
        parent if marked and (parent / CONFIG_FILE).is_file() else None)
    return Adapter(str(ref), path, run)


def _run_settings(run: Path) -> dict[str, Any]:
    """The run's qorpo_config.yaml as plain values (validated by TrainConfig when used)."""
    import yaml

    try:
        values = yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise EvalInputError(f"{run / CONFIG_FILE}: cannot be read ({exc}); pass the settings "
                             "as flags instead.") from exc
    if not isinstance(values, dict):
        raise EvalInputError(f"{run / CONFIG_FILE}: not a mapping of option: value.")
    return values


def _base_of(adapter: Adapter, settings: dict[str, Any]) -> str:
    """The base model the adapter was trained on: its run's --model, else peft's record."""
    if settings.get("model"):
        return str(settings["model"])
    try:
        config = json.loads((adapter.path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"{adapter.path / ADAPTER_CONFIG}: unreadable ({exc}).") from exc
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise EvalInputError(f"{adapter.path / ADAPTER_CONFIG} names no base model: pass the "
                             "base model as MODEL and this folder as --adapter.")
    return str(base)


def _check_weights(adapter: Adapter, allow_pickle: bool) -> None:
    if (adapter.path / "adapter_model.safetensors").is_file():
        return
    if (adapter.path / "adapter_model.bin").is_file():
        if allow_pickle:
            return
        raise EvalInputError(f"{adapter.path}: the adapter is a pickle file (adapter_model.bin), "
                             "loaded only with --allow-pickle.")
    raise EvalInputError(f"{adapter.path}: adapter_model.safetensors is missing (the adapter "
                         "was not saved completely).")


def _architecture(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _check_architecture(base: str, adapter: Adapter) -> None:
    """An adapter trained on another architecture than the base given: refused by name (peft
    would fail later on a missing module, or load silently into a same-named one)."""
    if adapter.run is None or not Path(base).expanduser().is_dir():
        return
    try:
        trained = json.loads((adapter.run / RUN_FILE).read_text()).get("base_model") or {}
    except (OSError, ValueError, AttributeError):
        return
    have = _architecture(Path(base).expanduser())
    want = trained.get("model_type")
    if have and want and have != want:
        raise EvalInputError(f"--adapter {adapter.name} was trained on a {want} model "
                             f"({trained.get('name_or_path')}); {base} is a {have} model.")


def resolve(model: str, adapters: list[str], flags: dict[str, Any]) -> EvalInputs:
    """The base, the adapters and the eval settings (run's settings, then the given flags)."""
    notes: list[str] = []
    found = [adapter_of(a) for a in adapters]
    base, base_name = model, model
    path = Path(model).expanduser()
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():  # MODEL is a run or checkpoint
        found.insert(0, adapter_of(model, "MODEL"))
        base = base_name = ""
    elif path.is_dir() and not (path / "config.json").is_file():
        raise EvalInputError(f"MODEL {model} is neither a model folder (config.json) nor a run "
                             f"or checkpoint folder ({ADAPTER_CONFIG}).")
    names = [a.name for a in found]
    if len(set(names)) < len(names):
        raise EvalInputError(f"an adapter is given twice: {', '.join(names)}")
    first_run = next((a.run for a in found if a.run is not None), None)
    settings = _run_settings(first_run) if first_run is not None else {}
    if not base:
        base = _base_of(found[0], _run_settings(found[0].run) if found[0].run else {})
        base_name = f"base ({base})"
    for a in found:
        _check_weights(a, bool(flags.get("allow_pickle")))
        _check_architecture(base, a)
        if a.run is not None and a.run != first_run:
            other = _run_settings(a.run)
            differ = [k for k in SCORING if k not in flags and other.get(k) != settings.get(k)]
            if differ:
                notes.append(f"{a.name} was trained with other {', '.join(differ)} than "
                             f"{first_run}: all are scored with the latter's")
    # --data replaces the run's data settings as a whole: its eval file, split or held-out
    # fraction belong to its own data
    keep = SCORING if flags.get("data") is not None else (*SCORING, *DATA)
    values = {k: settings[k] for k in keep if k in settings}
    values |= {k: v for k, v in flags.items() if v is not None}
    values |= {"model": base, "gradient_checkpointing": False, "report_to": ["none"],
               "trust_remote_code": bool(flags.get("trust_remote_code")),
               "allow_pickle": bool(flags.get("allow_pickle"))}
    cfg = TrainConfig.from_dict(values, source="qorpo eval")
    if cfg.data is None:
        raise ConfigError(["give --data FILE_OR_HUB_ID (the pairs to score); without it qorpo "
                           "eval scores the eval set of a run given as MODEL or --adapter"])
    return EvalInputs(cfg, base_name, found, notes)


def scored_set(cfg: TrainConfig) -> tuple[TrainConfig, bool]:
    """The config whose prepared data holds the pairs to score, and whether they are its eval
    set (True) or its train set. A run's separate eval file or split is read on its own (its
    train rows are not tokenized); a held-out fraction needs the run's rows to split them
    exactly as training did."""
    import dataclasses

    if cfg.eval_data:
        same = cfg.eval_data == cfg.data
        return dataclasses.replace(cfg, data=cfg.eval_data, split=cfg.eval_split or cfg.split,
                                   subset=cfg.subset if same else None, eval_data=None,
                                   eval_split=None, max_samples=None), False
    if cfg.eval_split:
        return dataclasses.replace(cfg, split=cfg.eval_split, eval_split=None,
                                   max_samples=None), False
    return cfg, cfg.eval_fraction > 0

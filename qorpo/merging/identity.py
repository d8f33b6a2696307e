"""Which architecture an adapter was trained on, so a merge onto another one is refused.

Shapes alone do not tell: a Llama adapter fits a Qwen2 base of the same size tensor for tensor,
merges, and even verifies (the check compares with that same wrong base + adapter). Sources,
first found wins: ``qorpo_run.json`` (``base_model``, written by training next to the adapter;
a ``checkpoint-N`` folder uses its run folder's), the config of adapter_config.json's
``base_model_name_or_path`` when that is a local folder or in the local HF cache, and peft's
``auto_mapping.base_model_class``. When none is there, the merge proceeds as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from qorpo.errors import MergeError

RUN_FILE = "qorpo_run.json"  # qorpo.runs.RUN_FILE (not imported: runs pulls in training code)


class Arch(NamedTuple):
    model_type: str | None
    architectures: tuple[str, ...]
    source: str  # where it was read, for the message

    def describe(self) -> str:
        names = ", ".join(self.architectures)
        if self.model_type and names:
            return f"{self.model_type} ({names})"
        return self.model_type or names or "unknown"


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _of_config(cfg: dict[str, Any], source: str) -> Arch | None:
    archs = tuple(a for a in cfg.get("architectures") or () if isinstance(a, str))
    model_type = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None
    return Arch(model_type, archs, source) if (model_type or archs) else None


def _from_run_file(adapter: Path) -> Arch | None:
    folders = [adapter, adapter.parent] if adapter.name.startswith("checkpoint-") else [adapter]
    for folder in folders:
        base = _read(folder / RUN_FILE).get("base_model")
        if isinstance(base, dict):
            found = _of_config(base, str(folder / RUN_FILE))
            if found is not None:
                return found
    return None


def _from_base_ref(adapter_cfg: dict[str, Any]) -> Arch | None:
    ref = adapter_cfg.get("base_model_name_or_path")
    if not isinstance(ref, str) or not ref:
        return None
    config = Path(ref).expanduser() / "config.json"
    if not config.is_file():
        try:  # a hub id: only what is already in the local cache (no network)
            from huggingface_hub import try_to_load_from_cache

            revision = adapter_cfg.get("revision")
            cached = try_to_load_from_cache(ref, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing to learn from it
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    return _of_config(_read(config), f"{ref} (adapter_config.json's base_model_name_or_path)")


def _from_peft(adapter_cfg: dict[str, Any]) -> Arch | None:
    mapping = adapter_cfg.get("auto_mapping")
    cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if not isinstance(cls, str) or not cls.endswith("ForCausalLM"):
        return None  # PeftModelForCausalLM-style wrappers name no architecture
    return Arch(None, (cls,), "adapter_config.json's auto_mapping")


def trained_on(adapter: Path, adapter_cfg: dict[str, Any]) -> Arch | None:
    """The architecture the adapter was trained on, when anything records it."""
    return _from_run_file(adapter) or _from_base_ref(adapter_cfg) or _from_peft(adapter_cfg)


def check_architecture(
    adapter: Path, adapter_cfg: dict[str, Any], base_dir: Path, base_cfg: dict[str, Any]
) -> None:
    """Refuse a base of another architecture than the adapter's, naming both."""
    trained = trained_on(adapter, adapter_cfg)
    base = _of_config(base_cfg, str(base_dir / "config.json"))
    if trained is None or base is None:
        return
    if trained.model_type and base.model_type:
        same = trained.model_type == base.model_type
    elif trained.architectures and base.architectures:
        same = bool(set(trained.architectures) & set(base.architectures))
    else:
        return
    if not same:
        raise MergeError(
            f"the adapter in {adapter} was trained on a {trained.describe()} model (from "
            f"{trained.source}), but the base {base_dir} is a {base.describe()} model; merging "
            "it there would give a broken model even where the shapes fit. Pass the base it was "
            "trained on (--base)."
        )

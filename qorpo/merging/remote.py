"""Custom model code (a config's ``auto_map``): the merge imports none of it unless asked.

transformers asks "Do you wish to run the custom code? [y/N]" on stdin when a folder's
``auto_map`` names a class it has no built-in version of and ``trust_remote_code`` is left
unset; ``y`` (or ``yes |``) would then import and run the folder's Python files. The merge
therefore looks before anything is loaded: without ``trust_remote_code`` a folder that needs
its own code is refused, and every transformers call gets ``trust_remote_code`` explicitly
(never ``None``), so nothing ever prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qorpo.errors import MergeError

_MODEL_CLASSES = ("AutoConfig", "AutoModelForCausalLM")


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot read {path}: {exc}; copy the folder again") from None
    return value if isinstance(value, dict) else {}


def _tokenizer_map(tok_cfg: dict[str, Any], cfg: dict[str, Any]) -> Any:
    """The AutoTokenizer entry of tokenizer_config.json (a list in the legacy format) or
    config.json."""
    for auto in (tok_cfg.get("auto_map"), cfg.get("auto_map")):
        if isinstance(auto, list | tuple):
            return list(auto)
        if isinstance(auto, dict) and auto.get("AutoTokenizer"):
            return auto["AutoTokenizer"]
    return None


def _builtin_tokenizer(name: Any) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not isinstance(name, str):
        return False
    for cand in (name, name.removesuffix("Fast"), name.removesuffix("Fast") + "Fast"):
        cls = tokenizer_class_from_name(cand)
        if cls is not None and cls.__module__.startswith("transformers."):
            return True
    return False


def code_needed(folder: Path) -> tuple[str, str, str] | None:
    """(file, auto class, code reference) of an ``auto_map`` entry transformers would have to
    import from ``folder`` (it has no built-in class for it), else None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = _json(folder / "config.json")
    auto = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
    model_type = cfg.get("model_type")
    builtin = {
        "AutoConfig": model_type in CONFIG_MAPPING_NAMES,
        "AutoModelForCausalLM": model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    }
    for cls in _MODEL_CLASSES:
        if auto.get(cls) and not builtin[cls]:
            return "config.json", cls, str(auto[cls])
    tok_cfg = _json(folder / "tokenizer_config.json")
    tok_map = _tokenizer_map(tok_cfg, cfg)
    if tok_map and not _builtin_tokenizer(tok_cfg.get("tokenizer_class")):
        refs = [r for r in (tok_map if isinstance(tok_map, list) else [tok_map]) if r]
        return "tokenizer_config.json", "AutoTokenizer", ", ".join(map(str, refs))
    return None


def check_custom_code(folders: list[Path], trust: bool) -> list[str]:
    """Refuse a folder whose model or tokenizer needs its own code unless ``trust``; returns
    notes (code that was run, or a custom auto_map that transformers' built-in class replaces)."""
    notes = []
    for folder in dict.fromkeys(folders):
        need = code_needed(folder)
        if need is not None:
            file, cls, ref = need
            if not trust:
                raise MergeError(
                    f"{folder / file} needs custom code: its auto_map maps {cls} to {ref}, "
                    f"Python code in {folder} that loading it would run. Nothing was run. Read "
                    "that code; if you trust it, pass --trust-remote-code (trust_remote_code=True)."
                )
            notes.append(f"ran the custom code of {folder} ({cls} -> {ref}; --trust-remote-code)")
        elif _json(folder / "config.json").get("auto_map") and not trust:
            notes.append(
                f"{folder}/config.json names custom code (auto_map); not run: transformers' "
                "built-in class for its model_type was used"
            )
    return notes


def copy_code(folders: list[Path], dest: Path) -> list[str]:
    """Copy the Python files the config's ``auto_map`` names (and what they import relatively)
    from ``folders`` into ``dest``, so the merged folder loads with ``trust_remote_code``."""
    from transformers.dynamic_module_utils import get_relative_import_files

    copied: list[str] = []
    for folder in folders:
        cfg = _json(folder / "config.json")
        auto = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
        refs = [r for v in auto.values() for r in (v if isinstance(v, list) else [v]) if r]
        for ref in refs:
            if "--" in str(ref):  # code in another hub repo: transformers fetches it itself
                continue
            module = folder / (str(ref).rsplit(".", 1)[0].replace(".", "/") + ".py")
            if not module.is_file():
                continue
            for src in [str(module), *get_relative_import_files(str(module))]:
                rel = Path(src).relative_to(folder)
                if not (dest / rel).exists():
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest / rel)
                    copied.append(str(rel))
    return copied

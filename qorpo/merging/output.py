"""Everything in the merged folder but the weights: config.json, generation_config.json (with
the chat template's end-of-turn token), the tokenizer, and the README model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qorpo._version import __version__
from qorpo.hf import CONFIG_NAMES, end_of_turn_ids

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path:
    """The tokenizer the adapter was trained with (saved next to it by the trainer) wins."""
    if any((adapter_dir / f).is_file() for f in _TOKENIZER_FILES):
        return adapter_dir
    return base_dir


def _write_config(tmp: Path, base_dir: Path, dtype: str, untied: bool) -> dict[str, Any]:
    """config.json: the base's, minus quantization_config, with the merged dtype and tie flag."""
    src = tmp / "config.json" if (tmp / "config.json").is_file() else base_dir / "config.json"
    config = json.loads(src.read_text())
    config.pop("quantization_config", None)
    torch_name = CONFIG_NAMES[dtype]
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            cfg.pop("quantization_config", None)
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = torch_name
            if untied:
                cfg["tie_word_embeddings"] = False
    config["dtype"] = torch_name
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _write_generation_config(
    tmp: Path, base_dir: Path, config: dict[str, Any], eot: list[int]
) -> None:
    src = base_dir / "generation_config.json"
    gen = json.loads(src.read_text()) if src.is_file() else {}
    if not gen:
        gen = {
            k: config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(k) is not None
        }
    eos = gen.get("eos_token_id")
    eos_list = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    eos_list = list(dict.fromkeys([*eos_list, *eot]))
    if eos_list:
        gen["eos_token_id"] = eos_list[0] if len(eos_list) == 1 else eos_list
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(
    tmp: Path, source: Path, base_dir: Path, trust_remote_code: bool
) -> tuple[Any, list[str]]:
    from transformers import AutoTokenizer

    notes = []
    tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    if not getattr(tok, "chat_template", None) and source != base_dir:
        base_tok = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
        if getattr(base_tok, "chat_template", None):
            tok.chat_template = base_tok.chat_template
            notes.append("adapter tokenizer has no chat template; took the base model's")
    tok.save_pretrained(str(tmp))
    return tok, notes


def _write_readme(
    tmp: Path, title: str, base_ref: str, adapter_dir: Path, settings: dict[str, Any]
) -> None:
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    (tmp / "README.md").write_text(
        f"---\nbase_model: {base_ref}\nlibrary_name: transformers\n"
        "tags: [qorpo, orpo, lora, merged]\n---\n\n"
        f"# {title}\n\n"
        f"LoRA adapter `{adapter_dir.name}` merged into `{base_ref}` with qorpo "
        f"{__version__}. Loads with plain `transformers` "
        "(`AutoModelForCausalLM.from_pretrained`); needs neither peft nor qorpo.\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )


def write_model_files(
    tmp: Path,
    *,
    title: str,
    adapter: Path,
    base_dir: Path,
    base_ref: str,
    dtype: str,
    untied: bool,
    settings: dict[str, Any],
    trust_remote_code: bool = False,
) -> tuple[Path, list[str]]:
    """Everything but the weights: config, tokenizer (+ chat template), generation config, card.
    Returns where the tokenizer came from and notes for the user."""
    tok_src = tokenizer_source(adapter, base_dir)
    config = _write_config(tmp, base_dir, dtype, untied)
    tokenizer, notes = _save_tokenizer(tmp, tok_src, base_dir, trust_remote_code)
    _write_generation_config(tmp, base_dir, config, end_of_turn_ids(tokenizer))
    _write_readme(tmp, title, base_ref, adapter, settings)
    return tok_src, notes

"""The hyper-parameter half of a GGUF header: config.json read, checked and written as the
metadata llama.cpp reads (generic keys, rope, the family's extras from ``families.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qorpo.errors import MergeError
from qorpo.export.families import Family, extra_metadata, family_of, head_dim, rotary_fraction

Q = gguf.GGMLQuantizationType
OUT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
_NEEDED = (
    "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size",
    "max_position_embeddings", "vocab_size",
)  # fmt: skip


def read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise MergeError(f"{src} has no config.json; export a folder written by `qorpo merge`")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def need(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise MergeError(f"config.json has no {key!r}, which the GGUF header needs")
    return config[key]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 ``rope_parameters`` (Gemma 3: its full-attention entry), or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention") or params)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def eps_key(family: Family) -> str:
    return "layer_norm_eps" if family.layer_norm else "rms_norm_eps"


def check_config(config: dict[str, Any], out_type: str) -> Family:
    """Refuse what cannot be exported before anything is written: the type, the architecture
    (named), missing hyper-parameters, rope scaling or variants llama.cpp would run differently."""
    if out_type not in OUT_TYPES:
        raise MergeError(f"unknown GGUF type {out_type!r}; use one of {', '.join(OUT_TYPES)}")
    family = family_of(config)
    for key in (*_NEEDED, eps_key(family)):
        need(config, key)
    kind = rope_parameters(config)["rope_type"]
    if kind not in ROPE_TYPES:
        raise MergeError(f"rope type {kind!r} is not supported by the GGUF export")
    return family


def rope_freqs(config: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.x rope scaling as llama.cpp wants it: a divisor per rotary frequency (its
    convert_hf_to_gguf.py writes the same tensor; transformers computes it on the fly)."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    wavelen = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx, factor = rope.get("original_max_position_embeddings", 8192), rope["factor"]
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth))
    return np.where(wavelen < old_ctx / high, 1.0, out).astype(np.float32)


def add_value(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One metadata value with the GGUF type llama.cpp reads it as."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        raise TypeError(f"no GGUF type for {key}={value!r}")


def add_hparams(
    w: gguf.GGUFWriter, config: dict[str, Any], family: Family, out_type: str, name: str
) -> None:
    heads, hidden = need(config, "num_attention_heads"), need(config, "hidden_size")
    dim = head_dim(config)
    w.add_name(name)
    w.add_context_length(need(config, "max_position_embeddings"))
    w.add_embedding_length(hidden)
    w.add_block_count(need(config, "num_hidden_layers"))
    w.add_feed_forward_length(need(config, "intermediate_size"))
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if family.layer_norm:
        w.add_layer_norm_eps(need(config, "layer_norm_eps"))
    else:
        w.add_layer_norm_rms_eps(need(config, "rms_norm_eps"))
    w.add_vocab_size(need(config, "vocab_size"))
    w.add_rope_dimension_count(int(dim * rotary_fraction(config)))
    if config.get("head_dim") or dim != hidden // heads:  # else llama.cpp assumes hidden/heads
        w.add_key_length(dim)
        w.add_value_length(dim)
    rope = rope_parameters(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    for key, value in extra_metadata(family, config).items():
        add_value(w, key, value)
    w.add_file_type(OUT_TYPES[out_type][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

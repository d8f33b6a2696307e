"""Per-family facts of the GGUF export: which llama.cpp architecture, how tensors are laid out,
which extra metadata llama.cpp reads, and the variants it would run differently (refused).

Names and keys come from the gguf package (``gguf.MODEL_ARCH``, ``gguf.Keys``); the quirks
follow llama.cpp's convert_hf_to_gguf.py and what its C++ hard-codes per architecture:

* Q/K rows permuted into llama.cpp's rotary layout only for the llama-style converters (Llama,
  Mistral, Mixtral, Granite, SmolLM3); the rest use HF's layout as is.
* Gemma 1/2/3 norms are stored as ``1 + w`` (HF's GemmaRMSNorm multiplies by ``1 + w``;
  llama.cpp by the stored weight). The embedding scale sqrt(hidden) is built into llama.cpp.
* GPT-NeoX's fused QKV is interleaved per head in HF; llama.cpp wants [Q; K; V].
* Phi-3 / GLM-4 fused gate_up stays fused as ``ffn_up`` (llama.cpp splits it at run time).
* Mixture-of-experts weights are stacked per layer into ``ffn_{gate,up,down}_exps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf

from qorpo.errors import MergeError

A = gguf.MODEL_ARCH
K = gguf.Keys


@dataclass(frozen=True)
class Family:
    """How one HF architecture becomes llama.cpp's ``arch``. ``extra``: the family's own GGUF
    keys (``gguf.Keys`` templates) from config.json; ``check``: raises for a variant llama.cpp
    would run differently."""

    arch: gguf.MODEL_ARCH
    permute: bool = False  # llama.cpp's Q/K row permutation (its LlamaModel-based converters)
    norm_offset: float = 0.0  # added to every *norm.weight (Gemma: llama.cpp stores 1 + w)
    layer_norm: bool = False  # LayerNorm (layer_norm_eps) instead of RMSNorm (rms_norm_eps)
    qkv_per_head: bool = False  # GPT-NeoX: fused QKV interleaved per head -> [Q; K; V]
    # transformers' GGUF loader reads it back (logits through their reader); else our read-back
    hf_reader: bool = False
    # config.json keys that loader drops (their GGUF keys are checked by the read-back's metadata
    # comparison): copied into its config so that the logits are comparable
    hf_patch: tuple[str, ...] = ()
    extra: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda c: {})
    check: Callable[[dict[str, Any]], None] = field(default=lambda c: None)


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rotary_fraction(config: dict[str, Any]) -> float:
    """partial_rotary_factor (top level or in rope_parameters) / GPT-NeoX's rotary_pct."""
    rope = config.get("rope_parameters") or {}
    for value in (rope.get("partial_rotary_factor"), config.get("partial_rotary_factor"),
                  config.get("rotary_pct")):  # fmt: skip
        if value is not None:
            return float(value)
    return 1.0


def layer_types(config: dict[str, Any]) -> list[str]:
    return list(config.get("layer_types") or [])


def is_moe(config: dict[str, Any]) -> bool:
    return bool(config.get("num_local_experts") or config.get("num_experts"))


def _experts(config: dict[str, Any]) -> dict[str, Any]:
    n = config.get("num_local_experts") or config.get("num_experts")
    return {K.LLM.EXPERT_COUNT: int(n), K.LLM.EXPERT_USED_COUNT: int(config["num_experts_per_tok"])}


def _qwen3moe(config: dict[str, Any]) -> dict[str, Any]:
    ffn = int(config["moe_intermediate_size"])
    return _experts(config) | {K.LLM.EXPERT_FEED_FORWARD_LENGTH: ffn}


def _check_qwen3moe(config: dict[str, Any]) -> None:
    if not config.get("norm_topk_prob", False):
        raise MergeError("Qwen3-MoE with norm_topk_prob=false: llama.cpp always renormalises the "
                         "top-k expert weights, so it would compute a different model")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise MergeError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is "
                         "not supported by llama.cpp's qwen3moe")


def _check_attn_scale(config: dict[str, Any], name: str) -> None:
    """llama.cpp scales attention by 1/sqrt(head_dim) (by hidden/heads for 27B models only);
    query_pre_attn_scalar is not in GGUF."""
    scalar = config.get("query_pre_attn_scalar")
    ok = {head_dim(config)}
    if config["num_hidden_layers"] in (46, 62):  # the 27B models llama.cpp recognises
        ok.add(config["hidden_size"] // config["num_attention_heads"])
    if scalar is not None and scalar not in ok:
        raise MergeError(f"{name} with query_pre_attn_scalar={scalar} (head_dim "
                         f"{head_dim(config)}): llama.cpp scales attention by head_dim")


def _check_pattern(config: dict[str, Any], name: str, every: int) -> None:
    """llama.cpp hard-codes the sliding-window layer pattern: layer i slides unless
    (i + 1) is a multiple of ``every``."""
    want = ["sliding_attention" if (i + 1) % every else "full_attention"
            for i in range(config["num_hidden_layers"])]  # fmt: skip
    got = layer_types(config) or want
    pattern = config.get("sliding_window_pattern", every)  # older configs: no layer_types
    if config.get("sliding_window") and (got != want or pattern != every):
        raise MergeError(f"{name} with layer_types {got}: llama.cpp runs the fixed pattern {want}")


def _gemma2(config: dict[str, Any]) -> dict[str, Any]:
    return {
        K.LLM.ATTN_LOGIT_SOFTCAPPING: float(config["attn_logit_softcapping"]),
        K.LLM.FINAL_LOGIT_SOFTCAPPING: float(config["final_logit_softcapping"]),
        K.Attention.SLIDING_WINDOW: int(config["sliding_window"]),
    }


def _check_gemma2(config: dict[str, Any]) -> None:
    _check_attn_scale(config, "Gemma 2")
    _check_pattern(config, "Gemma 2", 2)
    caps = (config.get("attn_logit_softcapping"), config.get("final_logit_softcapping"))
    if None in caps:
        raise MergeError("Gemma 2 without soft-capping: llama.cpp's gemma2 always applies it")


def gemma3_local_base(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    local = rope.get("sliding_attention") or {}
    return float(local.get("rope_theta") or config.get("rope_local_base_freq") or 10000.0)


def _check_gemma3(config: dict[str, Any]) -> None:
    _check_attn_scale(config, "Gemma 3")
    _check_pattern(config, "Gemma 3", 6)
    if gemma3_local_base(config) != 10000.0:
        raise MergeError(f"Gemma 3 with a sliding-layer rope base of {gemma3_local_base(config)}: "
                         "llama.cpp hard-codes 10000")
    if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
        raise MergeError("Gemma 3 with logit soft-capping: llama.cpp's gemma3 does not apply it")


def _window(config: dict[str, Any]) -> dict[str, Any]:
    window = config.get("sliding_window")
    return {K.Attention.SLIDING_WINDOW: int(window)} if window else {}


def _check_phi3(config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) in ("longrope", "su"):
        raise MergeError("Phi-3 with longrope scaling is not supported by the GGUF export yet")


def _granite(config: dict[str, Any]) -> dict[str, Any]:
    return {
        K.LLM.EMBEDDING_SCALE: float(config.get("embedding_multiplier", 1.0)),
        K.LLM.RESIDUAL_SCALE: float(config.get("residual_multiplier", 1.0)),
        K.Attention.SCALE: float(config.get("attention_multiplier", head_dim(config) ** -0.5)),
        K.LLM.LOGIT_SCALE: float(config.get("logits_scaling", 1.0)),
    }


def _check_smollm3(config: dict[str, Any]) -> None:
    """llama.cpp hard-codes SmolLM3's no-rope layers: every 4th."""
    want = [int((i + 1) % 4 != 0) for i in range(config["num_hidden_layers"])]
    got = config.get("no_rope_layers") or want
    if list(got) != want:
        raise MergeError(f"SmolLM3 with no_rope_layers {got}: llama.cpp runs {want}")


def _neox(config: dict[str, Any]) -> dict[str, Any]:
    return {K.LLM.USE_PARALLEL_RESIDUAL: bool(config.get("use_parallel_residual", True))}


def _stablelm(config: dict[str, Any]) -> dict[str, Any]:
    return {K.LLM.USE_PARALLEL_RESIDUAL: bool(config.get("use_parallel_residual", False))}


def _check_stablelm(config: dict[str, Any]) -> None:
    if config.get("qk_layernorm"):
        raise MergeError("StableLM with qk_layernorm is not supported by the GGUF export yet")


def _cohere(config: dict[str, Any]) -> dict[str, Any]:
    return {K.LLM.LOGIT_SCALE: float(config.get("logit_scale", 1.0))}


_GEMMA2_PATCH = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                 "layer_types")  # fmt: skip
_GEMMA3_PATCH = ("query_pre_attn_scalar", "layer_types", "rope_parameters", "rope_local_base_freq")
_LLAMA = Family(A.LLAMA, permute=True, hf_reader=True)
# HF architecture -> family. Keys of ``extra``: gguf.Keys templates ("{arch}.…").
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,  # "llama" to llama.cpp (its converter does the same)
    "MixtralForCausalLM": Family(A.LLAMA, permute=True, extra=_experts),
    "Qwen2ForCausalLM": Family(A.QWEN2, hf_reader=True),
    "Qwen3ForCausalLM": Family(A.QWEN3, hf_reader=True, hf_patch=("head_dim",)),
    "Qwen3MoeForCausalLM": Family(A.QWEN3MOE, extra=_qwen3moe, check=_check_qwen3moe,
                                  hf_reader=True, hf_patch=("moe_intermediate_size",)),
    "GemmaForCausalLM": Family(A.GEMMA, norm_offset=1.0),
    "Gemma2ForCausalLM": Family(A.GEMMA2, norm_offset=1.0, extra=_gemma2, check=_check_gemma2,
                                hf_reader=True, hf_patch=_GEMMA2_PATCH),
    "Gemma3ForCausalLM": Family(A.GEMMA3, norm_offset=1.0, extra=_window, check=_check_gemma3,
                                hf_reader=True, hf_patch=_GEMMA3_PATCH),
    "Phi3ForCausalLM": Family(A.PHI3, extra=_window, check=_check_phi3, hf_reader=True),
    "Olmo2ForCausalLM": Family(A.OLMO2),
    "GraniteForCausalLM": Family(A.GRANITE, permute=True, extra=_granite),
    "SmolLM3ForCausalLM": Family(A.SMOLLM3, permute=True, check=_check_smollm3),
    "GPTNeoXForCausalLM": Family(A.GPTNEOX, layer_norm=True, qkv_per_head=True, extra=_neox),
    "StableLmForCausalLM": Family(A.STABLELM, layer_norm=True, extra=_stablelm,
                                  check=_check_stablelm, hf_reader=True,
                                  hf_patch=("partial_rotary_factor", "rope_parameters")),
    "CohereForCausalLM": Family(A.COMMAND_R, layer_norm=True, extra=_cohere),
    "Glm4ForCausalLM": Family(A.GLM4),
}
# config.json model_type -> the architecture name, for folders without "architectures"
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM", "smollm3": "SmolLM3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM", "stablelm": "StableLmForCausalLM",
    "cohere": "CohereForCausalLM", "glm4": "Glm4ForCausalLM",
}  # fmt: skip


def architecture(config: dict[str, Any]) -> str:
    names = config.get("architectures") or []
    if names:
        return str(names[0])
    model_type = str(config.get("model_type", "?"))
    return _MODEL_TYPES.get(model_type, model_type)


def family_of(config: dict[str, Any]) -> Family:
    """The family of a config.json, or a one-line refusal naming the architecture."""
    name = architecture(config)
    if name not in FAMILIES:
        raise MergeError(
            f"GGUF export does not support architecture {name!r}; supported: "
            f"{', '.join(FAMILIES)}. llama.cpp's convert_hf_to_gguf.py covers more."
        )
    family = FAMILIES[name]
    family.check(config)
    return family


def extra_metadata(family: Family, config: dict[str, Any]) -> dict[str, Any]:
    """The family's extra GGUF keys (full names) and values."""
    arch = gguf.MODEL_ARCH_NAMES[family.arch]
    return {key.format(arch=arch): value for key, value in family.extra(config).items()}

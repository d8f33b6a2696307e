"""An independent read-back of a GGUF file, for the families transformers' GGUF loader cannot
read (and the metadata it ignores, for all): every tensor dequantised with the gguf package, the
export's documented transforms undone (Q/K permute, Gemma's +1 norms, GPT-NeoX's QKV order, MoE
stacking), put under the HF model's own parameter names and loaded into the HF model class built
from config.json; llama.cpp's metadata keys compared with config.json one by one.

Written apart from the writer on purpose: names go HF -> GGUF through the gguf name map from the
HF *model's* parameters (transformers' runtime layout, e.g. fused experts), not the checkpoint's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from qorpo.export.families import Family, head_dim, rotary_fraction
from qorpo.export.hparams import rope_parameters

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def gguf_name(names: gguf.TensorNameMap, key: str) -> str | None:
    """The GGUF tensor an HF parameter lives in (a fused ``experts.gate_up_proj``: its gate)."""
    key = key.replace("experts.gate_up_proj", "experts.gate_proj")
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is not None and not name.endswith((".weight", ".bias")):
        name += ".weight"
    return name


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary pairs -> HF's halves, per head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def _unfuse_neox(w: np.ndarray, n_head: int) -> np.ndarray:
    """[Q; K; V] rows -> GPT-NeoX's per-head (q, k, v) interleave."""
    return w.reshape(3, n_head, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _array(tensor: Any) -> np.ndarray:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml order is reversed
    return np.asarray(data, dtype=np.float32).reshape(shape)


def hf_state_dict(
    reader: gguf.GGUFReader, model: PreTrainedModel, config: dict[str, Any], family: Family,
    problems: list[str],
) -> dict[str, torch.Tensor]:
    """The GGUF's tensors under ``model``'s parameter names, transforms undone; tensors the
    model does not take, or parameters the file lacks (a tied head aside), go to ``problems``."""
    stored = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    used, out = {"rope_freqs.weight"}, {}
    tied = bool(config.get("tie_word_embeddings", False))
    for key, param in model.state_dict().items():
        name = gguf_name(names, key)
        if tied and key.endswith(("lm_head.weight", "embed_out.weight")):
            continue  # the embeddings, tied
        if name is None or name not in stored:
            why = "has no GGUF name" if name is None else f"is not in the file ({name})"
            problems.append(f"read-back: {key} {why}")
            continue
        w = _array(stored[name])
        used.add(name)
        if key.endswith("experts.gate_up_proj"):  # transformers' runtime layout: gate then up
            up = name.replace("ffn_gate_exps", "ffn_up_exps")
            used.add(up)
            w = np.concatenate([w, _array(stored[up])], axis=-2)
        role = name.split(".")[2] if name.startswith("blk.") else ""
        if family.permute and role in ("attn_q", "attn_k"):
            w = _unpermute(w, heads if role == "attn_q" else kv_heads)
        if family.qkv_per_head and role == "attn_qkv":
            w = _unfuse_neox(w, heads)
        if family.norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(family.norm_offset)
        if tuple(w.shape) != tuple(param.shape):
            problems.append(f"read-back: {name} has shape {w.shape}, {key} {tuple(param.shape)}")
            continue
        out[key] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    extra = sorted(set(stored) - used)
    if extra:
        problems.append(f"read-back: tensors no parameter of the HF model takes: {extra[:4]}")
    return out


def load_readback_model(
    reader: gguf.GGUFReader, config: dict[str, Any], family: Family, problems: list[str]
) -> PreTrainedModel:
    """The HF model class built from config.json, with the GGUF's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    weights = hf_state_dict(reader, model, config, family, problems)
    model.load_state_dict(weights, strict=False)
    if config.get("tie_word_embeddings"):
        model.tie_weights()
    return model.eval()


def within_q8_bound(w: np.ndarray, q: np.ndarray) -> bool:
    """q8_0 stores each 32-block as int8 x an f16 scale d = amax/127: no value moves by more than
    half a step (d/2) plus 127 x the scale's own f16 rounding (large where d is an f16 subnormal,
    as in real checkpoints' small blocks), plus fp32 slack."""
    blocks, got = w.reshape(-1, 32), q.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    d16_err = np.abs(d.astype(np.float16).astype(np.float32) - d)
    bound = d / 2 + 127 * d16_err + 1e-6 * 127 * d + 1e-30
    return bool((np.abs(got - blocks) <= bound).all())


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


# llama.cpp's per-family keys -> the config.json key(s) they carry: written apart from the
# writers in families.py (which use gguf.Keys), so that a wrong writer entry shows up here.
_FAMILY_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "gemma2": {"attn_logit_softcapping": ("attn_logit_softcapping",),
               "final_logit_softcapping": ("final_logit_softcapping",),
               "attention.sliding_window": ("sliding_window",)},
    "gemma3": {"attention.sliding_window": ("sliding_window",)},
    "phi3": {"attention.sliding_window": ("sliding_window",)},
    "granite": {"embedding_scale": ("embedding_multiplier",),
                "residual_scale": ("residual_multiplier",),
                "attention.scale": ("attention_multiplier",), "logit_scale": ("logits_scaling",)},
    "command-r": {"logit_scale": ("logit_scale",)},
    "qwen3moe": {"expert_count": ("num_experts", "num_local_experts"),
                 "expert_used_count": ("num_experts_per_tok",),
                 "expert_feed_forward_length": ("moe_intermediate_size",)},
    "llama": {"expert_count": ("num_local_experts",),
              "expert_used_count": ("num_experts_per_tok",)},
    "gptneox": {"use_parallel_residual": ("use_parallel_residual",)},
    "stablelm": {"use_parallel_residual": ("use_parallel_residual",)},
}  # fmt: skip


def _family_keys(arch: str, config: dict[str, Any]) -> dict[str, Any]:
    want = {}
    for key, sources in _FAMILY_KEYS.get(arch, {}).items():
        value = next((config[k] for k in sources if config.get(k) is not None), None)
        if value is not None:
            want[f"{arch}.{key}"] = value
    return want


def expected_hparams(config: dict[str, Any], family: Family) -> dict[str, Any]:
    """What llama.cpp must read from the file for this config.json."""
    arch = gguf.MODEL_ARCH_NAMES[family.arch]
    k, att = gguf.Keys.LLM, gguf.Keys.Attention
    heads = config["num_attention_heads"]
    want: dict[str, Any] = {
        k.CONTEXT_LENGTH: config["max_position_embeddings"],
        k.EMBEDDING_LENGTH: config["hidden_size"],
        k.BLOCK_COUNT: config["num_hidden_layers"],
        k.FEED_FORWARD_LENGTH: config["intermediate_size"],
        att.HEAD_COUNT: heads,
        att.HEAD_COUNT_KV: config.get("num_key_value_heads") or heads,
        gguf.Keys.Rope.DIMENSION_COUNT: int(head_dim(config) * rotary_fraction(config)),
        gguf.Keys.Rope.FREQ_BASE: float(rope_parameters(config)["rope_theta"]),
    }
    if family.layer_norm:
        want[att.LAYERNORM_EPS] = config["layer_norm_eps"]
    else:
        want[att.LAYERNORM_RMS_EPS] = config["rms_norm_eps"]
    if config.get("head_dim") or head_dim(config) != config["hidden_size"] // heads:
        want[att.KEY_LENGTH] = want[att.VALUE_LENGTH] = head_dim(config)
    want = {key.format(arch=arch): value for key, value in want.items()}
    return want | _family_keys(arch, config)


def check_hparams(reader: gguf.GGUFReader, config: dict[str, Any], family: Family) -> list[str]:
    """Every metadata value llama.cpp reads for this family, against config.json."""
    problems = []
    for key, want in expected_hparams(config, family).items():
        got = _field(reader, key)
        same = got == want if isinstance(want, (bool, int)) and not isinstance(want, float) else (
            got is not None and np.isclose(got, want, rtol=1e-6)
        )
        if not same:
            problems.append(f"metadata {key} is {got}, config.json says {want}")
    return problems


def check_spm_scores(reader: gguf.GGUFReader, hf_tok: Any) -> list[str]:
    """A SentencePiece file: llama.cpp merges the adjacent pair whose joined piece has the
    highest score, so the scores must fall strictly along the HF tokenizer's merge ranks
    (transformers' GGUF reader rebuilds merges from token order too, so it cannot tell)."""
    import json

    if _field(reader, "tokenizer.ggml.model") != "llama":
        return []
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    index = {t: i for i, t in enumerate(tokens)}
    merges = json.loads(hf_tok.backend_tokenizer.to_str())["model"].get("merges", [])
    seen, ranked = set(), []
    for merge in merges:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if a + b not in seen and a + b in index:
            seen.add(a + b)
            ranked.append(scores[index[a + b]])
    if any(x <= y for x, y in zip(ranked, ranked[1:], strict=False)):
        return ["tokenizer.ggml.scores do not follow the tokenizer's merge order: llama.cpp "
                "would merge (and so tokenize) differently"]
    return []

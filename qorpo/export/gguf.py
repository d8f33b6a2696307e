"""The model half of a GGUF file: which architectures, hyper-parameters, the tensor plan, and the
streaming writer.

Streaming: shapes come from the safetensors headers, so the GGUF header, metadata and tensor
table are written first; then each tensor is read alone (``safe_open``), converted and appended
with ``GGUFWriter.write_tensor_data``. Peak memory is a few copies of the largest tensor (source,
fp32, output), never the model.

llama.cpp conventions followed (from its convert_hf_to_gguf.py): 1-D tensors (norms, biases) stay
F32; q8_0 falls back to F16 for rows not divisible by the 32-element block; Llama-family Q/K rows
are permuted into llama.cpp's rotary layout (Qwen2 is not); a tied lm_head is not written; Llama
3 rope scaling is the ``rope_freqs`` tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf
import numpy as np

from qorpo.errors import MergeError
from qorpo.export.vocab import TokenizerMeta, add_tokenizer

if TYPE_CHECKING:
    import torch

Q = gguf.GGMLQuantizationType
OUT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# HF architecture -> (GGUF architecture, permute Q/K rows for llama.cpp's rotary layout).
# Mistral is "llama" to llama.cpp (its convert script does the same).
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
_NEEDED = (
    "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size",
    "max_position_embeddings", "rms_norm_eps", "vocab_size",
)  # fmt: skip
F16_MAX = 65504.0


class TensorPlan(NamedTuple):
    source: str  # HF tensor name
    file: Path
    name: str  # GGUF tensor name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    permute_heads: int  # 0: none; else llama.cpp's Q/K permute with this many heads


def read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise MergeError(f"{src} has no config.json; export a folder written by `qorpo merge`")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 ``rope_parameters``, or the older ``rope_theta`` + ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def check_config(config: dict[str, Any], out_type: str) -> tuple[gguf.MODEL_ARCH, bool]:
    """Refuse what cannot be exported before anything is written: the type, the architecture
    (named), missing hyper-parameters, rope scaling llama.cpp would not apply the same way.
    Returns the GGUF architecture and whether Q/K rows are permuted."""
    if out_type not in OUT_TYPES:
        raise MergeError(f"unknown GGUF type {out_type!r}; use one of {', '.join(OUT_TYPES)}")
    names = config.get("architectures") or [config.get("model_type", "?")]
    if names[0] not in ARCHITECTURES:
        raise MergeError(
            f"GGUF export does not support architecture {names[0]!r} yet; supported: "
            f"{', '.join(ARCHITECTURES)}. llama.cpp's convert_hf_to_gguf.py covers more."
        )
    for key in _NEEDED:
        need(config, key)
    kind = rope_parameters(config)["rope_type"]
    if kind not in ROPE_TYPES:
        raise MergeError(f"rope type {kind!r} is not supported by the GGUF export")
    return ARCHITECTURES[names[0]]


def need(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise MergeError(f"config.json has no {key!r}, which the GGUF header needs")
    return config[key]


def tensor_type(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> Q:
    """The GGML type one tensor gets in a file of ``qtype`` (the verifier replays this)."""
    if len(shape) <= 1:
        return Q.F32  # llama.cpp keeps norms and biases in F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # rows must split into 32-element blocks; llama.cpp falls back the same way
    return qtype


def _weight_files(src: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    if index.is_file():
        return {k: src / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = src / "model.safetensors"
    if not single.is_file():
        raise MergeError(f"no model.safetensors(.index.json) in {src}; export needs safetensors")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def plan_tensors(
    src: Path, config: dict[str, Any], arch: gguf.MODEL_ARCH, permute: bool, qtype: Q
) -> list[TensorPlan]:
    """GGUF name, shape and type of every tensor, from the safetensors headers alone."""
    from safetensors import safe_open

    files = _weight_files(src)
    names = gguf.get_tensor_name_map(arch, need(config, "num_hidden_layers"))
    tied = bool(config.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in files:
        raise MergeError("config says the embeddings are not tied, but there is no lm_head.weight")
    heads = {"attn_q": need(config, "num_attention_heads")}
    heads["attn_k"] = config.get("num_key_value_heads") or heads["attn_q"]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in dict.fromkeys(files.values()):
        with safe_open(str(file), framework="pt") as f:
            shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    plan = []
    for key, file in files.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # a buffer some old checkpoints saved / the tied copy of the embeddings
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MergeError(f"tensor {key!r} has no {gguf.MODEL_ARCH_NAMES[arch]} GGUF name")
        shape = shapes[key]
        role = name.split(".")[-2] if name.startswith("blk.") else ""
        n_heads = heads.get(role, 0) if permute else 0
        plan.append(TensorPlan(key, file, name, shape, tensor_type(shape, qtype), n_heads))
    plan.sort(key=lambda p: (not p.name.startswith("token_embd"), p.name.startswith("output")))
    return plan


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


def add_hparams(w: gguf.GGUFWriter, config: dict[str, Any], out_type: str, name: str) -> None:
    heads, hidden = need(config, "num_attention_heads"), need(config, "hidden_size")
    head_dim = config.get("head_dim") or hidden // heads
    w.add_name(name)
    w.add_context_length(need(config, "max_position_embeddings"))
    w.add_embedding_length(hidden)
    w.add_block_count(need(config, "num_hidden_layers"))
    w.add_feed_forward_length(need(config, "intermediate_size"))
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(need(config, "rms_norm_eps"))
    w.add_vocab_size(need(config, "vocab_size"))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:  # llama.cpp assumes hidden / heads unless told
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = rope_parameters(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    w.add_file_type(OUT_TYPES[out_type][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor from a safetensors file; nothing else of the file is read."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary halves -> llama.cpp's interleaved pairs, per head (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def convert_tensor(t: TensorPlan) -> np.ndarray:
    import torch

    data = read_tensor(t.file, t.source).to(torch.float32).numpy()  # numpy has no bfloat16
    if t.qtype == Q.F16 and data.size and float(np.abs(data).max()) > F16_MAX:
        raise MergeError(
            f"{t.source} holds values up to {float(np.abs(data).max()):.4g}, beyond f16's range "
            f"(±{F16_MAX:g}); export bf16 instead"
        )
    if t.permute_heads:
        data = llama_permute(data, t.permute_heads)
    return gguf.quants.quantize(data, t.qtype)


def write_gguf(
    path: Path, config: dict[str, Any], arch: gguf.MODEL_ARCH, plan: list[TensorPlan],
    tok: TokenizerMeta, out_type: str, name: str, progress: bool = False,
) -> None:
    """Header, metadata and tensor table first, then the tensors one at a time."""
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        add_hparams(w, config, out_type, name)
        add_tokenizer(w, tok)
        extra = rope_freqs(config)
        for t in plan:  # the tensor table up front, from shapes alone
            # byte shape in, element shape recorded: GGUFWriter's convention for raw types
            shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            w.add_tensor_info(t.name, shape, np.dtype(np.uint8), math.prod(shape), t.qtype)
        if extra is not None:
            rope_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            w.add_tensor_info(rope_name, extra.shape, extra.dtype, extra.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if progress:
            from tqdm import tqdm

            plan = tqdm(plan, desc="GGUF tensors", unit="tensor")  # type: ignore[assignment]
        for t in plan:  # one tensor in memory at a time
            w.write_tensor_data(convert_tensor(t))
        if extra is not None:
            w.write_tensor_data(extra)
    finally:
        w.close()


def file_bytes(n_params: int, out_type: str) -> int:
    """About how large the file gets (for the disk check): 2 bytes a weight for f16 / bf16,
    34 bytes per 32 weights for q8_0, plus the tokenizer."""
    per_weight = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[out_type]
    return int(n_params * per_weight) + 32 * 2**20

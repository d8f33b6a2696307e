"""The model half of a GGUF file: the tensor plan (GGUF name, shape, type and transform of every
tensor) and the streaming writer. Architectures and their quirks: ``families.py``; metadata:
``hparams.py``.

Streaming: shapes come from the safetensors headers, so the GGUF header, metadata and tensor
table are written first; then each tensor is read alone (``safe_open``), converted and appended
with ``GGUFWriter.write_tensor_data``. Peak memory is a few copies of the largest GGUF tensor
(source, fp32, output; a mixture-of-experts layer's stacked experts), never the model.

llama.cpp conventions followed (from its convert_hf_to_gguf.py): 1-D tensors, ``*_norm`` weights
and MoE routers (``ffn_gate_inp``) stay F32; q8_0 falls back to F16 for rows not divisible by the
32-element block; a tied lm_head is not written; Llama 3 rope scaling is the ``rope_freqs``
tensor; per-family transforms (permute, norm offset, stacking, QKV order) in ``families.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf
import numpy as np

from qorpo.errors import MergeError
from qorpo.export.families import Family
from qorpo.export.hparams import (  # noqa: F401 - re-exported: the export's one entry module
    OUT_TYPES,
    ROPE_TYPES,
    add_hparams,
    check_config,
    need,
    read_config,
    rope_freqs,
    rope_parameters,
)
from qorpo.export.vocab import TokenizerMeta, add_tokenizer

if TYPE_CHECKING:
    import torch

Q = gguf.GGMLQuantizationType
F16_MAX = 65504.0
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(.*)")  # one expert's tensor in a MoE layer


class TensorPlan(NamedTuple):
    source: str  # HF tensor name (a stacked tensor: the first expert's)
    file: Path
    name: str  # GGUF tensor name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    permute_heads: int  # 0: none; else llama.cpp's Q/K permute with this many heads
    offset: float = 0.0  # added to the values (Gemma norms: llama.cpp stores 1 + w)
    stack: tuple[tuple[str, Path], ...] = ()  # MoE: every expert's (name, file), stacked on dim 0
    half: int = -1  # 0 / 1: the gate / up half (dim -2) of a fused experts.gate_up_proj
    qkv_heads: int = 0  # GPT-NeoX: QKV interleaved per head -> [Q; K; V], with this many heads


def tensor_type(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, name: str = "") -> Q:
    """The GGML type one tensor (GGUF ``name``) gets in a file of ``qtype`` (the verifier
    replays this)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return Q.F32  # llama.cpp keeps norms, biases and MoE routers in F32
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


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in dict.fromkeys(files.values()):
        with safe_open(str(file), framework="pt") as f:
            shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return shapes


def _sources(
    files: dict[str, Path], shapes: dict[str, tuple[int, ...]], tied: bool
) -> dict[str, tuple[tuple[tuple[str, Path], ...], tuple[int, ...], int]]:
    """GGUF-side source name -> (HF tensors, shape, half): experts grouped (``experts.3.w1`` ->
    ``experts.w1``, stacked), a fused ``experts.gate_up_proj`` split into its two halves."""
    groups: dict[str, dict[int, tuple[str, Path]]] = {}
    out: dict[str, tuple[tuple[tuple[str, Path], ...], tuple[int, ...], int]] = {}
    for key, file in files.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # a buffer some old checkpoints saved / the tied copy of the embeddings
        if m := _EXPERT.fullmatch(key):
            groups.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = (key, file)
        elif key.endswith("experts.gate_up_proj"):  # transformers >= 5's fused layout
            n, rows, cols = shapes[key]
            for half, part in enumerate(("gate_proj", "up_proj")):
                shape = (n, rows // 2, cols)
                out[key.replace("gate_up_proj", part)] = (((key, file),), shape, half)
        else:
            out[key] = (((key, file),), shapes[key], -1)
    for base, experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise MergeError(f"{base}: experts {sorted(experts)} are not numbered 0..n-1")
        stack = tuple(experts[i] for i in range(len(experts)))
        out[base] = (stack, (len(stack), *shapes[stack[0][0]]), -1)
    return out


def plan_tensors(
    src: Path, config: dict[str, Any], family: Family, qtype: Q
) -> list[TensorPlan]:
    """GGUF name, shape, type and transform of every tensor, from the safetensors headers."""
    files = _weight_files(src)
    names = gguf.get_tensor_name_map(family.arch, need(config, "num_hidden_layers"))
    tied = bool(config.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in files and "embed_out.weight" not in files:
        raise MergeError("config says the embeddings are not tied, but there is no lm_head.weight")
    heads = {"attn_q": need(config, "num_attention_heads")}
    heads["attn_k"] = config.get("num_key_value_heads") or heads["attn_q"]
    plan = []
    for key, (sources, shape, half) in _sources(files, _shapes(files), tied).items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MergeError(
                f"tensor {key!r} has no {gguf.MODEL_ARCH_NAMES[family.arch]} GGUF name"
            )
        if not name.endswith((".weight", ".bias")):
            name += ".weight"  # a bare parameter (fused experts): llama.cpp names it a weight
        role = name.split(".")[2] if name.startswith("blk.") else ""
        (first, file), stack = sources[0], sources if len(sources) > 1 else ()
        plan.append(TensorPlan(
            first, file, name, shape, tensor_type(shape, qtype, name),
            heads.get(role, 0) if family.permute else 0,
            family.norm_offset if name.endswith("norm.weight") else 0.0, stack, half,
            heads["attn_q"] if family.qkv_per_head and role == "attn_qkv" else 0,
        ))  # fmt: skip
    plan.sort(key=lambda p: (not p.name.startswith("token_embd"), p.name.startswith("output")))
    return plan


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


def neox_qkv(w: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX's fused QKV rows, (head, q|k|v, dim) in HF -> [Q; K; V] for llama.cpp."""
    return w.reshape(n_head, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _source(t: TensorPlan) -> np.ndarray:
    import torch

    if t.stack:  # numpy has no bfloat16: fp32 before numpy
        return np.stack([read_tensor(f, k).to(torch.float32).numpy() for k, f in t.stack])
    data = read_tensor(t.file, t.source).to(torch.float32).numpy()
    if t.half >= 0:
        data = np.ascontiguousarray(np.split(data, 2, axis=-2)[t.half])
    return data


def convert_tensor(t: TensorPlan) -> np.ndarray:
    data = _source(t)
    if t.qkv_heads:
        data = neox_qkv(data, t.qkv_heads)
    if t.offset:
        data = data + np.float32(t.offset)
    if t.qtype == Q.F16 and data.size and float(np.abs(data).max()) > F16_MAX:
        raise MergeError(
            f"{t.source} holds values up to {float(np.abs(data).max()):.4g}, beyond f16's range "
            f"(±{F16_MAX:g}); export bf16 instead"
        )
    if t.permute_heads:
        data = llama_permute(data, t.permute_heads)
    return gguf.quants.quantize(data, t.qtype)


def write_gguf(
    path: Path, config: dict[str, Any], family: Family, plan: list[TensorPlan],
    tok: TokenizerMeta, out_type: str, name: str, progress: bool = False,
) -> None:
    """Header, metadata and tensor table first, then the tensors one at a time."""
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.arch])
    try:
        add_hparams(w, config, family, out_type, name)
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

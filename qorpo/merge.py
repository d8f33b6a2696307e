"""Merge a LoRA adapter into its base model for deployment.

The default *streaming* merge never builds the model: it walks the base checkpoint shard by
shard, tensor by tensor, folds each LoRA delta in (in fp32) and streams the result straight into
output safetensors files whose layout is planned up front, so peak memory stays around one input
shard plus the adapter whatever the model size. ``method="full"`` loads the model and uses peft's
``merge_and_unload()`` instead (for adapter features the streaming path does not handle).

Everything is written into a temporary sibling of the output folder and renamed into place at
the end: a crash, Ctrl-C or a full disk never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from qorpo.merge_verify import VerifyReport

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_PREFIX = "base_model.model."
# LoRA variants whose merge is not W + s·B@A (or not expressible tensor by tensor).
_UNSUPPORTED_FLAGS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "megatron_config",
)
# Inits that leave the base weights alone (PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA rewrite them).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
_FULL_HINT = "use --method full (loads the model and merges with peft's merge_and_unload())."


class MergeError(RuntimeError):
    """The merge cannot proceed; the message says what is wrong and what to do."""


class MergeVerificationError(MergeError):
    """The merged model's logits disagree with base + adapter beyond tolerance."""

    def __init__(self, message: str, report: VerifyReport) -> None:
        super().__init__(message)
        self.report = report


class MergeResult(NamedTuple):
    """What :func:`merge` wrote, and how well it matches base + adapter."""

    out_dir: Path
    base: Path  # the resolved base model folder
    adapter_dir: Path
    method: str  # "stream" | "full"
    into: str  # "original" | "dequantized"
    dtype: str  # "bf16" | "fp16" | "fp32"
    weight_files: tuple[str, ...]
    total_bytes: int
    merged_modules: int  # LoRA modules folded into base weights
    replaced_tensors: int  # tensors copied from the adapter (modules_to_save, saved layers)
    untied: tuple[str, ...]  # tied weights written separately because the adapter changes one
    tokenizer_source: Path
    verification: VerifyReport | None
    notes: tuple[str, ...]
    seconds: float


# ----------------------------------------------------------------------------- LoRA algebra


def lora_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
) -> torch.Tensor:
    """``scale · B @ A`` in fp32, laid out like the base weight.

    nn.Linear stores (out, in) = B @ A. GPT-2's Conv1D (``fan_in_fan_out``) stores (in, out) and
    peft's LoRA Embedding keeps A as (r, vocab) and B as (hidden, r): both need the transpose.
    """
    delta = lora_b.float() @ lora_a.float()
    return (delta.T if (fan_in_fan_out or embedding) else delta) * scale


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of an adapter."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None  # lora_B.bias, trained with lora_bias=True

    @property
    def weight_shape(self) -> tuple[int, int]:
        out, inp = self.lora_b.shape[0], self.lora_a.shape[1]
        return (inp, out) if (self.embedding or self.fan_in_fan_out) else (out, inp)

    def add_to_(self, weight: torch.Tensor) -> None:
        """``weight += scale · B @ A`` in place (addmm_ avoids a weight-sized temporary)."""
        a, b = self.lora_a.float(), self.lora_b.float()
        if self.embedding or self.fan_in_fan_out:
            weight.addmm_(a.T, b.T, alpha=self.scale)  # (B @ A).T == A.T @ B.T
        else:
            weight.addmm_(b, a, alpha=self.scale)


def peft_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling for ``module``: alpha/r, or alpha/sqrt(r) with rslora, per-module patterns.

    Patterns match like ``peft.utils.other.get_pattern_key``: a key (regex allowed) matching a
    dotted suffix of the module path.
    """

    def lookup(patterns: dict[str, Any] | None, default: Any) -> Any:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    expected = int(lookup(config.get("rank_pattern"), config.get("r", 8)))
    if expected != rank:
        raise MergeError(
            f"adapter module {module!r} has rank {rank} but adapter_config.json implies "
            f"r={expected} (r / rank_pattern): the adapter files are inconsistent."
        )
    alpha = float(lookup(config.get("alpha_pattern"), config.get("lora_alpha", 8)))
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def nf4_round_trip(
    weight: torch.Tensor, *, transpose: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight as a bitsandbytes NF4 double-quant Linear4bit hands it to the matmul.

    Same call as transformers' ``load_in_4bit`` (blocksize 64, double quant), in the training
    compute dtype; Conv1D weights are quantised transposed, as transformers does.
    """
    import bitsandbytes.functional as bnbf

    w = weight.to(dtype)
    w = w.T.contiguous() if transpose else w
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out = bnbf.dequantize_4bit(packed, state).to(dtype)
    return out.T.contiguous() if transpose else out


# ----------------------------------------------------------------------------- the adapter


@dataclass
class Adapter:
    """A parsed LoRA adapter: LoRA modules plus whole tensors it replaces in the base."""

    path: Path
    config: dict[str, Any]
    loras: dict[str, LoraModule]
    replacements: dict[str, torch.Tensor]  # "module.param" -> tensor (modules_to_save, ...)
    # replacements saved as "x.base_layer.weight": peft loads them into the base layer itself,
    # i.e. into the parameter a tied pair shares (modules_to_save copies are the module's own)
    shared: set[str] = field(default_factory=set)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise MergeError(f"{cfg_file} not found: is {adapter_dir} a peft/qorpo adapter folder?")
    return json.loads(cfg_file.read_text())


def check_streamable(config: dict[str, Any]) -> None:
    """Refuse adapter features whose merge is not a plain ``W + s·B@A``."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeError(
            f"the streaming merge handles LoRA adapters, not {peft_type}; {_FULL_HINT}"
        )
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise MergeError(
                f"adapter sets {flag}={config[flag]!r}; streaming can't merge it; {_FULL_HINT}"
            )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise MergeError(
            f"adapter was initialised with init_lora_weights={init!r}, which rewrites the base "
            "weights; convert it to a plain LoRA first (peft save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), then merge."
        )


def _load_tensors(folder: Path, stem: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st_file, bin_file = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
    if st_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(st_file))
    if bin_file.is_file():
        _check_pickle(bin_file, allow_pickle)
        return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    raise MergeError(f"no {stem}.safetensors (or .bin) in {folder}")


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise MergeError(
            f"{path} is a pickle (.bin) file, which can run code when loaded. Convert it to "
            "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it; it is then "
            "read with torch.load(weights_only=True)."
        )


_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "eA",
    ".lora_embedding_B": "eB",
}


def read_adapter(adapter_dir: Path, *, allow_pickle: bool = False) -> Adapter:
    """Parse an adapter folder for the streaming merge, refusing what it cannot merge exactly."""
    config = read_adapter_config(adapter_dir)
    check_streamable(config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    shared: set[str] = set()
    for raw, value in _load_tensors(adapter_dir, "adapter_model", allow_pickle).items():
        if not raw.startswith(_PREFIX):
            raise MergeError(f"unexpected key {raw!r} in {adapter_dir} (no {_PREFIX!r} prefix)")
        key = raw[len(_PREFIX) :]
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = value
        elif ".lora_" in key:
            raise MergeError(f"adapter tensor {key!r} is not a plain LoRA weight; {_FULL_HINT}")
        else:
            # "x.base_layer.weight" (peft saves targeted embedding layers) and "x.weight"
            # (modules_to_save; older files: "x.modules_to_save.weight") replace base "x.weight".
            if ".base_layer." in key:
                key = key.replace(".base_layer.", ".")
                shared.add(key)
            replacements[key.replace(".modules_to_save.", ".")] = value
    loras = {name: _lora_module(config, name, p) for name, p in parts.items()}
    return Adapter(adapter_dir, config, loras, replacements, shared)


def _lora_module(config: dict[str, Any], name: str, p: dict[str, torch.Tensor]) -> LoraModule:
    embedding = "eA" in p or "eB" in p
    a, b = (p.get("eA"), p.get("eB")) if embedding else (p.get("A"), p.get("B"))
    if a is None or b is None:
        raise MergeError(f"adapter module {name!r} has only one of lora_A / lora_B")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise MergeError(
            f"adapter module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are "
            f"not a 2-D LoRA pair (conv layer?); {_FULL_HINT}"
        )
    return LoraModule(
        name=name,
        lora_a=a,
        lora_b=b,
        scale=peft_scale(config, name, a.shape[0]),
        embedding=embedding,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not embedding,
        bias=p.get("bias"),
    )


# ----------------------------------------------------------------------------- base checkpoint


@dataclass
class BaseCheckpoint:
    """The base model's weight files, known from their headers only (nothing loaded)."""

    path: Path
    files: list[Path]
    meta: dict[str, tuple[str, tuple[int, ...]]]  # key -> (safetensors dtype, shape), file order
    where: dict[str, Path]
    pickle: bool

    @contextmanager
    def reader(self, file: Path) -> Iterator[Callable[[str], torch.Tensor]]:
        """Tensor getter for one file that keeps at most one tensor's pages in memory."""
        if self.pickle:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            yield lambda key: state[key].contiguous()
            del state
            return
        yield partial(_read_tensor, file)

    def get(self, key: str) -> torch.Tensor:
        with self.reader(self.where[key]) as get:
            return get(key)


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor via safe_open, opened per tensor on purpose.

    safe_open hands out zero-copy views of one mmap of the whole file; every page touched stays
    resident (and counted in RSS) while the handle is open, so reading a 5 GB shard through one
    handle peaks at ~5 GB. A handle per tensor unmaps each tensor once it has been written, so
    the peak is the largest tensor instead (header re-parsing costs ~0.1 ms).
    """
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))


def open_base(base_dir: Path, *, allow_pickle: bool = False) -> BaseCheckpoint:
    """Index the base checkpoint (safetensors, or .bin with ``allow_pickle``)."""
    for stem, ext, pickle in (("model", "safetensors", False), ("pytorch_model", "bin", True)):
        index, single = base_dir / f"{stem}.{ext}.index.json", base_dir / f"{stem}.{ext}"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({base_dir / f for f in weight_map.values()})
        elif single.is_file():
            files = [single]
        else:
            continue
        if pickle:
            _check_pickle(files[0], allow_pickle)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MergeError(
                f"base checkpoint {base_dir} is incomplete: {missing[0].name} is missing"
            )
        meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        where: dict[str, Path] = {}
        for file in files:
            for key, (dtype, shape) in _file_meta(file, pickle).items():
                meta[key], where[key] = (dtype, shape), file
        return BaseCheckpoint(base_dir, files, meta, where, pickle)
    raise MergeError(f"no model.safetensors / model.safetensors.index.json in {base_dir}")


def _file_meta(file: Path, pickle: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    if not pickle:
        meta = {k: (v["dtype"], tuple(v["shape"])) for k, v in _safetensors_header(file).items()}
        odd = next((k for k, (dt, _) in meta.items() if dt not in _ST_DTYPES), None)
        if odd is not None:
            raise MergeError(f"{file.name}: tensor {odd!r} has unsupported dtype {meta[odd][0]}")
        return meta
    state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    return {k: (_ST_NAMES[t.dtype], tuple(t.shape)) for k, t in state.items()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return _ST_DTYPES[dtype].itemsize * _numel(shape)


# ----------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the base architecture, read off a weightless (meta-device) instance."""

    tied: dict[str, str] = field(default_factory=dict)  # tied weight -> the weight it shares
    quantized: dict[str, bool] = field(
        default_factory=dict
    )  # weights bnb 4-bit quantises -> Conv1D?
    conv1d: frozenset[str] = frozenset()  # modules whose weight is stored (in, out)
    keep_fp32: tuple[str, ...] = ()


def model_info(base_dir: Path) -> ModelInfo:
    """Instantiate the architecture on the meta device (no memory) to learn ties and 4-bit targets.

    The quantised set comes from transformers' own helpers (those ``load_in_4bit`` uses: every
    nn.Linear/Conv1D except the output embedding, tied weights, the last module and
    ``_keep_in_fp32_modules``), so the ``into="dequantized"`` round trip touches exactly the
    weights that training saw through NF4.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    cfg = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    keep = sorted(getattr(model, "_keep_in_fp32_modules", None) or [])
    skip = HfQuantizer.get_modules_to_not_convert(model, None, keep)
    quantized: dict[str, bool] = {}
    conv1d = set()
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            conv1d.add(name)
        if (
            type(module) is torch.nn.Linear or isinstance(module, Conv1D)
        ) and should_convert_module(name, skip):
            quantized[f"{name}.weight"] = isinstance(module, Conv1D)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return ModelInfo(tied, quantized, frozenset(conv1d), tuple(keep))


def _model_info_or_none(base_dir: Path, *, needed: bool) -> tuple[ModelInfo, str | None]:
    try:
        return model_info(base_dir), None
    except Exception as exc:  # noqa: BLE001 - unknown/custom architecture
        if needed:
            raise MergeError(
                f"cannot instantiate the base architecture ({exc}), so the 4-bit quantised set is "
                "unknown; --into dequantized needs it (use --into original)"
            ) from exc
        return ModelInfo(), f"architecture not instantiable ({exc}); tied weights not checked"


# ----------------------------------------------------------------------------- planning


@dataclass
class Item:
    """How to produce one output tensor."""

    key: str  # output name
    source: str  # base tensor it starts from (a tied weight starts from what it shares)
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    loras: list[LoraModule] = field(default_factory=list)
    bias_of: LoraModule | None = None
    replacement: torch.Tensor | None = None
    nf4: bool | None = None  # NF4 round trip first; the value says "Conv1D (transposed)"

    @property
    def touched(self) -> bool:
        return (
            bool(self.loras or self.bias_of or self.nf4 is not None) or self.replacement is not None
        )


class Plan(NamedTuple):
    items: list[Item]
    untied: list[str]
    merged_modules: int
    replaced: int


def _find_key(module: str, param: str, keys: set[str]) -> str | None:
    """Checkpoint key of ``module.param``; also finds checkpoints saved without the outer
    wrapper prefix (``layers.0...`` for module ``model.layers.0...``)."""
    parts = module.split(".")
    for i in range(len(parts)):
        cand = ".".join([*parts[i:], param])
        if cand in keys:
            return cand
    return None


def build_plan(
    adapter: Adapter,
    base: BaseCheckpoint,
    info: ModelInfo,
    out_dtype: torch.dtype,
    *,
    dequantize: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Plan:
    """Match every adapter module to a base tensor, shape-checked, before anything is written."""
    # Tied weights absent from the file (lm_head.weight) are targets too; a tied weight stored
    # anyway is ignored, as transformers re-ties it to its source on load.
    tied = {t: s for t, s in info.tied.items() if s in base.meta}
    keys = set(base.meta) | set(tied)
    items = {
        k: Item(k, k, _out_dtype(k, dt, out_dtype, info), shape)
        for k, (dt, shape) in base.meta.items()
        if k not in tied
    }

    def item_for(key: str) -> Item:
        if key not in items:
            src = items[tied[key]]
            items[key] = Item(key, src.source, src.dtype, src.shape)
        return items[key]

    for name, lora in sorted(adapter.loras.items()):
        key = _find_key(name, "weight", keys)
        if key is None:
            raise MergeError(
                f"adapter module {name!r} matches no weight in the base checkpoint {base.path}; "
                "was the adapter trained on a different base model? (pass --base)"
            )
        item = item_for(key)
        if not lora.embedding and _is_conv1d(name, key, info):
            lora = replace(lora, fan_in_fan_out=True)  # peft forces it for Conv1D, config or not
        if lora.weight_shape != item.shape:
            raise MergeError(
                f"adapter module {name!r}: LoRA delta {lora.weight_shape} does not fit base weight "
                f"{key!r} {item.shape}; the adapter was trained on a different base model."
            )
        item.loras.append(lora)
        if lora.bias is not None:
            bias_key = _find_key(name, "bias", keys)
            if bias_key is None:
                raise MergeError(
                    f"adapter module {name!r} trains a bias (lora_bias) but the base has none"
                )
            item_for(bias_key).bias_of = lora
    shared = set()
    for rkey, tensor in sorted(adapter.replacements.items()):
        module, param = rkey.rsplit(".", 1)
        key = _find_key(module, param, keys)
        if key is None:
            raise MergeError(
                f"adapter module {module!r} ({rkey}) matches nothing in the base {base.path}"
            )
        item = item_for(key)
        if tuple(tensor.shape) != item.shape:
            raise MergeError(
                f"adapter module {module!r}: saved tensor {tuple(tensor.shape)} does not match "
                f"base {key!r} {item.shape} (resized vocabulary? resize the base, --method full)."
            )
        item.replacement = tensor
        shared.update([key] if rkey in adapter.shared else [])
    for target, source in tied.items():  # a shared overwrite reaches both ends of a tie
        donor = next((k for k in (source, target) if k in shared), None)
        for key in (target, source) if donor else ():
            if item_for(key).replacement is None:
                items[key].replacement = items[donor].replacement
    if dequantize:
        for key, is_conv in info.quantized.items():
            if key in items and items[key].replacement is None:
                items[key].nf4 = is_conv
    untied = _settle_ties(items, tied, base, compute_dtype)
    return Plan(_ordered(items, base), untied, len(adapter.loras), len(adapter.replacements))


def _is_conv1d(module: str, key: str, info: ModelInfo) -> bool:
    return module in info.conv1d or key.removesuffix(".weight") in info.conv1d


def _out_dtype(key: str, dtype: str, out_dtype: torch.dtype, info: ModelInfo) -> str:
    src = _ST_DTYPES[dtype]
    if not src.is_floating_point:
        return dtype
    if src == torch.float32 and any(f".{m}." in f".{key}" for m in info.keep_fp32):
        return dtype  # the architecture pins these modules to fp32
    return _ST_NAMES[out_dtype]


def _settle_ties(
    items: dict[str, Item], tied: dict[str, str], base: BaseCheckpoint, compute_dtype: torch.dtype
) -> list[str]:
    """Keep a tied pair tied only if both ends come out identical; otherwise write both.

    peft applies a LoRA on embed_tokens to the input lookup only (one on lm_head to the output
    only), so folding it into the single shared matrix would change the model.
    """
    untied = []
    for target, source in tied.items():
        if source not in items or not (items[source].touched or target in items):
            continue
        t_item = items.get(target) or Item(
            target, items[source].source, items[source].dtype, items[source].shape
        )
        s_out = materialize(items[source], base.get, compute_dtype)
        if torch.equal(materialize(t_item, base.get, compute_dtype), s_out):
            items.pop(target, None)  # identical: stays tied; transformers re-ties it on load
        else:
            items[target] = t_item
            untied.append(target)
    return untied


def _ordered(items: dict[str, Item], base: BaseCheckpoint) -> list[Item]:
    """Checkpoint order; an untied weight goes right after its source (read from the same file)."""
    followers: dict[str, list[Item]] = {}
    for item in items.values():
        if item.key != item.source:
            followers.setdefault(item.source, []).append(item)
    out = []
    for key in base.meta:
        if key in items and items[key].source == key:
            out.append(items[key])
        out.extend(followers.get(key, []))
    return out


def materialize(
    item: Item, get: Callable[[str], torch.Tensor], compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One output tensor: base (or replacement) → NF4 round trip → + LoRA deltas (fp32) → cast."""
    w = item.replacement if item.replacement is not None else get(item.source)
    if not w.is_floating_point():
        return w
    if item.nf4 is not None:
        w = nf4_round_trip(w, transpose=item.nf4, dtype=compute_dtype)
    if item.loras or item.bias_of is not None:
        w = w.to(torch.float32, copy=True)  # never modify the caller's (adapter) tensor
        for lora in item.loras:
            lora.add_to_(w)
        if item.bias_of is not None and item.bias_of.bias is not None:
            w.add_(item.bias_of.bias.float(), alpha=item.bias_of.scale)
    return w.to(_ST_DTYPES[item.dtype])


# ----------------------------------------------------------------------------- writing


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '200KB' / bytes -> bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise MergeError(f"cannot parse size {size!r}: use e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * base**power)


def plan_shards(items: list[Item], max_bytes: int) -> list[list[Item]]:
    """Greedy split in write order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        n = _nbytes(item.dtype, item.shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes safetensors shards whose header is known up front, one tensor at a time.

    Planning the layout first (names, dtypes, shapes) lets each tensor go straight to disk
    instead of buffering a whole output shard in memory.
    """

    def __init__(self, folder: Path, shards: list[list[Item]]) -> None:
        self.folder = folder
        self.shards = shards
        self.names = shard_names(len(shards))
        self._queue = [(i, item) for i, shard in enumerate(shards) for item in shard]
        self._pos = 0
        self._shard = -1
        self._fh: Any = None

    def _open_shard(self, index: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for item in self.shards[index]:
            n = _nbytes(item.dtype, item.shape)
            header[item.key] = {
                "dtype": item.dtype,
                "shape": list(item.shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._fh = open(self.folder / self.names[index], "wb")  # noqa: SIM115 - closed in _finish_shard
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = index

    def _finish_shard(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        index, item = self._queue[self._pos]
        if (
            key != item.key
            or _ST_NAMES[tensor.dtype] != item.dtype
            or tuple(tensor.shape) != item.shape
        ):
            raise MergeError(
                f"internal error: got {key} {tensor.dtype} {tuple(tensor.shape)}, planned {item}"
            )
        if index != self._shard:
            if self._fh is not None:
                self._finish_shard()
            self._open_shard(index)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._queue):
            raise MergeError(f"internal error: wrote {self._pos} of {len(self._queue)} tensors")
        if self._fh is not None:
            self._finish_shard()
        if len(self.shards) > 1:
            weight_map = {
                it.key: n for n, shard in zip(self.names, self.shards, strict=True) for it in shard
            }
            total = sum(_nbytes(it.dtype, it.shape) for shard in self.shards for it in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _stream_merge(
    plan: Plan,
    base: BaseCheckpoint,
    tmp: Path,
    max_bytes: int,
    compute_dtype: torch.dtype,
    progress: bool,
) -> list[str]:
    writer = ShardWriter(tmp, plan_shards(plan.items, max_bytes))
    groups = [(f, list(g)) for f, g in groupby(plan.items, key=lambda it: base.where[it.source])]
    with _progress(progress, len(groups), "merging shards") as advance:
        try:
            for file, group in groups:
                with base.reader(file) as get:
                    for item in group:
                        writer.write(item.key, materialize(item, get, compute_dtype))
                        if item.touched:
                            _release_freed_memory()
                advance()
            writer.close()
        finally:
            writer.abort()
    return writer.names


def _release_freed_memory() -> None:
    """Give freed heap back to the OS (glibc only; a no-op elsewhere).

    After the first large free, glibc raises its mmap threshold, so later weight-sized fp32
    temporaries land on the heap and fragment it: without a trim, RSS creeps up tensor by tensor.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*cols, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


# ----------------------------------------------------------------------------- full (peft) merge


def _full_merge(
    adapter_dir: Path,
    base: BaseCheckpoint,
    info: ModelInfo,
    tmp: Path,
    out_dtype: torch.dtype,
    *,
    dequantize: bool,
    max_shard_size: str | int,
    compute_dtype: torch.dtype,
) -> tuple[list[str], list[str], int]:
    """Load in fp32, let peft merge_and_unload(), cast and save. Handles any peft adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base.path), dtype=torch.float32, use_safetensors=not base.pickle
    )
    if dequantize:
        with torch.no_grad():
            for key, is_conv in info.quantized.items():
                param = model.get_parameter(key)
                param.copy_(nf4_round_trip(param, transpose=is_conv, dtype=compute_dtype))
    untied = _untie_for_peft(model, adapter_dir, info)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    n_modules = sum(
        1 for m in peft_model.modules() if hasattr(m, "merge") and hasattr(m, "base_layer")
    )
    merged = peft_model.merge_and_unload()
    merged.to(out_dtype)
    merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    files = sorted(p.name for p in tmp.glob("*.safetensors"))
    return files, untied, n_modules


def _untie_for_peft(model: Any, adapter_dir: Path, info: ModelInfo) -> list[str]:
    """Give tied weights their own storage when the adapter touches one of them.

    peft's merge_and_unload() adds the delta into the shared matrix, which also changes the
    other end (for ensure_weight_tying adapters, it even adds it twice).
    """
    if not info.tied:
        return []
    state = _load_tensors(adapter_dir, "adapter_model", allow_pickle=True)  # policy checked
    keys = [k.removeprefix(_PREFIX) for k in state]
    untied = []
    for target, source in info.tied.items():
        mods = [m.removesuffix(".weight") for m in (target, source)]
        if any(k.startswith(m + ".") for k in keys for m in mods):
            module_name, param = target.rsplit(".", 1)
            shared = model.get_parameter(source)
            with torch.no_grad():  # what peft would load into the shared parameter
                for m in mods:
                    saved = state.get(f"{_PREFIX}{m}.base_layer.weight")
                    shared.copy_(saved) if saved is not None else None
            setattr(
                model.get_submodule(module_name), param, torch.nn.Parameter(shared.detach().clone())
            )
            untied.append(target)
    if untied:
        _set_tie_flag(model.config, False)
    return untied


def _adapter_keys(adapter_dir: Path, allow_pickle: bool) -> list[str]:
    st_file, bin_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st_file.is_file():
        from safetensors import safe_open

        with safe_open(str(st_file), framework="pt") as fh:
            return [k.removeprefix(_PREFIX) for k in fh.keys()]
    if bin_file.is_file():
        _check_pickle(bin_file, allow_pickle)
        state = torch.load(str(bin_file), map_location="cpu", weights_only=True, mmap=True)
        return [k.removeprefix(_PREFIX) for k in state]
    raise MergeError(f"no adapter_model.safetensors (or .bin) in {adapter_dir}")


def _set_tie_flag(config: Any, value: bool) -> None:
    config.tie_word_embeddings = value
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = value


# ----------------------------------------------------------------------------- output folder


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path:
    """The tokenizer the adapter was trained with (saved next to it by the trainer) wins."""
    if any((adapter_dir / f).is_file() for f in _TOKENIZER_FILES):
        return adapter_dir
    return base_dir


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn under the chat template (plus eos).

    Renders a one-turn conversation and takes the first token after the assistant text, so
    ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn> etc. all come out right.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        marker = "qorpo merge marker"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                tokenize=False,
            )
        except Exception:  # noqa: BLE001 - odd templates just fall back to eos
            text = ""
        tail = text.split(marker, 1)[1] if marker in text else ""
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        if tail_ids and tail_ids[0] in special:
            ids.append(tail_ids[0])
    return list(dict.fromkeys(ids))


def _write_config(tmp: Path, base_dir: Path, dtype: str, untied: bool) -> dict[str, Any]:
    """config.json: the base's, minus quantization_config, with the merged dtype and tie flag."""
    src = tmp / "config.json" if (tmp / "config.json").is_file() else base_dir / "config.json"
    config = json.loads(src.read_text())
    config.pop("quantization_config", None)
    torch_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
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


def _save_tokenizer(tmp: Path, source: Path, base_dir: Path) -> tuple[Any, list[str]]:
    from transformers import AutoTokenizer

    notes = []
    tok = AutoTokenizer.from_pretrained(str(source))
    if not getattr(tok, "chat_template", None) and source != base_dir:
        base_tok = AutoTokenizer.from_pretrained(str(base_dir))
        if getattr(base_tok, "chat_template", None):
            tok.chat_template = base_tok.chat_template
            notes.append("adapter tokenizer has no chat template; took the base model's")
    tok.save_pretrained(str(tmp))
    return tok, notes


def _write_readme(
    tmp: Path, title: str, base_ref: str, adapter_dir: Path, settings: dict[str, Any]
) -> None:
    import qorpo

    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    (tmp / "README.md").write_text(
        f"---\nbase_model: {base_ref}\nlibrary_name: transformers\n"
        "tags: [qorpo, orpo, lora, merged]\n---\n\n"
        f"# {title}\n\n"
        f"LoRA adapter `{adapter_dir.name}` merged into `{base_ref}` with qorpo "
        f"{qorpo.__version__}. Loads with plain `transformers` "
        "(`AutoModelForCausalLM.from_pretrained`); needs neither peft nor qorpo.\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )


# ----------------------------------------------------------------------------- base resolution


def resolve_base(ref: str, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder, else a hub id looked up in the local HF cache (then downloaded if online)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or ref.startswith(".") or ref.count("/") > 1:
        raise MergeError(f"base model folder {ref} does not exist; pass --base /path/to/base")
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    patterns += ["*.bin"] if allow_pickle else []
    try:
        return Path(
            snapshot_download(
                ref, revision=revision, local_files_only=True, allow_patterns=patterns
            )
        )
    except Exception as exc:  # noqa: BLE001 - not cached (or partial): maybe download below
        cache_error = exc
    if constants.HF_HUB_OFFLINE:
        raise MergeError(
            f"base model {ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it (`hf download {ref}`) or pass --base /path/to/base ({cache_error})"
        )
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001
        raise MergeError(f"cannot find or download base model {ref!r}: {exc}; pass --base") from exc


# ----------------------------------------------------------------------------- safety


def _check_out_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    for inp in inputs:
        if out == inp.resolve() or out in inp.resolve().parents:
            raise MergeError(f"output {out} would overwrite the input {inp}; choose another --out")
    if out.exists() and not force:
        raise MergeError(f"{out} already exists; pass --force (force=True) to replace it")


def _check_disk(parent: Path, need: int) -> None:
    free = shutil.disk_usage(parent).free
    margin = need // 20 + 64 * 2**20  # tokenizer, index, filesystem slack
    if free < need + margin:
        raise MergeError(
            f"not enough disk space in {parent}: the merged model needs about "
            f"{(need + margin) / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temp folder next to ``out``, renamed onto it only when everything succeeded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:  # Ctrl-C included: never leave a half-written model behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():  # --force: move the old one aside so the swap is a rename
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the previous model back
            os.replace(old / "x", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- public API


def resolve_dtype(dtype: str, base_config: dict[str, Any]) -> tuple[str, str | None]:
    """``auto`` -> the base's config dtype (dtype / torch_dtype), fp32 when it names none."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise MergeError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
        return dtype, None
    for cfg in (base_config, base_config.get("text_config") or {}):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and name.removeprefix("torch.") in _CONFIG_DTYPES:
            return _CONFIG_DTYPES[name.removeprefix("torch.")], None
    return "fp32", "base config names no dtype; writing fp32"


def merge(
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    into: str = "original",
    method: str = "stream",
    max_shard_size: str | int = "5GB",
    verify: bool | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> MergeResult:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and save it to ``out``.

    ``base`` defaults to the adapter's ``base_model_name_or_path``. ``into="dequantized"`` first
    passes every 4-bit-quantised weight through the NF4 round trip training saw (in
    ``compute_dtype``). ``verify=None`` verifies when the model comfortably fits in RAM.
    Raises :class:`MergeError` (nothing written) or :class:`MergeVerificationError`.
    """
    start = time.perf_counter()
    if into not in ("original", "dequantized") or method not in ("stream", "full"):
        raise MergeError(
            f"into must be original|dequantized and method stream|full, got {into!r}, {method!r}"
        )
    adapter = Path(adapter_dir).expanduser().resolve()
    adapter_cfg = read_adapter_config(adapter)
    base_ref = str(base) if base is not None else adapter_cfg.get("base_model_name_or_path")
    if not base_ref:
        raise MergeError(
            f"{adapter}/adapter_config.json names no base_model_name_or_path; pass --base"
        )
    base_dir = resolve_base(
        base_ref, revision=adapter_cfg.get("revision"), allow_pickle=allow_pickle
    )
    base_config = json.loads((base_dir / "config.json").read_text())
    if base_config.get("quantization_config"):
        raise MergeError(
            f"base {base_dir} is a pre-quantized checkpoint "
            f"({base_config['quantization_config'].get('quant_method')}); "
            "merge into the original 16/32-bit model instead: pass --base <original model>"
        )
    out_dir = Path(out).expanduser().absolute()
    _check_out_dir(out_dir, force, [adapter, base_dir])
    ckpt = open_base(base_dir, allow_pickle=allow_pickle)
    dtype_name, dtype_note = resolve_dtype(dtype, base_config)
    out_dtype = DTYPES[dtype_name]
    info, info_note = _model_info_or_none(base_dir, needed=into == "dequantized")
    plan = None
    if method == "stream":  # plan (and fail) before touching the disk
        parsed = read_adapter(adapter, allow_pickle=allow_pickle)
        plan = build_plan(
            parsed,
            ckpt,
            info,
            out_dtype,
            dequantize=into == "dequantized",
            compute_dtype=compute_dtype,
        )
        need = sum(_nbytes(it.dtype, it.shape) for it in plan.items)
    else:
        _adapter_keys(adapter, allow_pickle)  # same pickle policy as the streaming path
        need = sum(_nbytes(_ST_NAMES[out_dtype], s) for _, s in ckpt.meta.values())
    _check_disk(out_dir.parent, need)
    notes = [n for n in (dtype_note, info_note) if n]
    with _staging(out_dir) as tmp:
        if plan is not None:
            files = _stream_merge(
                plan, ckpt, tmp, parse_size(max_shard_size), compute_dtype, progress
            )
            untied, n_merged, n_replaced = plan.untied, plan.merged_modules, plan.replaced
        else:
            files, untied, n_merged = _full_merge(
                adapter,
                ckpt,
                info,
                tmp,
                out_dtype,
                dequantize=into == "dequantized",
                max_shard_size=max_shard_size,
                compute_dtype=compute_dtype,
            )
            n_replaced = 0
        notes += [f"untied {k} from {info.tied[k]}: the adapter changes it" for k in untied]
        settings = {"method": method, "into": into, "dtype": dtype_name, "adapter": str(adapter)}
        settings |= {"max_shard_size": max_shard_size, "untied": ", ".join(untied) or "-"}
        tok_src = _write_model_files(
            tmp, out_dir.name, adapter, base_dir, base_ref, settings, notes
        )
        report = _maybe_verify(tmp, adapter, ckpt, into, dtype_name, verify, notes)
    return MergeResult(
        out_dir=out_dir,
        base=base_dir,
        adapter_dir=adapter,
        method=method,
        into=into,
        dtype=dtype_name,
        weight_files=tuple(files),
        total_bytes=sum((out_dir / f).stat().st_size for f in files),
        merged_modules=n_merged,
        replaced_tensors=n_replaced,
        untied=tuple(untied),
        tokenizer_source=tok_src,
        verification=report,
        notes=tuple(notes),
        seconds=time.perf_counter() - start,
    )


def _write_model_files(
    tmp: Path,
    title: str,
    adapter: Path,
    base_dir: Path,
    base_ref: str,
    settings: dict[str, Any],
    notes: list[str],
) -> Path:
    """Everything but the weights: config, tokenizer (+ chat template), generation config, card."""
    tok_src = _tokenizer_source(adapter, base_dir)
    config = _write_config(tmp, base_dir, settings["dtype"], settings["untied"] != "-")
    tokenizer, tok_notes = _save_tokenizer(tmp, tok_src, base_dir)
    notes += tok_notes
    _write_generation_config(tmp, base_dir, config, end_of_turn_ids(tokenizer))
    _write_readme(tmp, title, base_ref, adapter, settings)
    return tok_src


def _maybe_verify(
    tmp: Path,
    adapter: Path,
    ckpt: BaseCheckpoint,
    into: str,
    dtype: str,
    verify: bool | None,
    notes: list[str],
) -> VerifyReport | None:
    from qorpo.merge_verify import verification_budget, verify_merged

    if verify is False:
        return None
    n_params = sum(_numel(shape) for _, shape in ckpt.meta.values())
    ok, why = verification_budget(n_params)
    if verify is None and not ok:
        notes.append(f"verification skipped: {why}; pass --verify to force it")
        return None
    report = verify_merged(
        tmp,
        adapter,
        ckpt.path,
        into=into,
        dtype=dtype,
        use_safetensors=not ckpt.pickle,
        other=None if ok else False,
    )
    if not report.passed:
        raise MergeVerificationError(
            f"merged model disagrees with base + adapter: {report.summary()}", report
        )
    return report


__all__ = [
    "DTYPES",
    "LoraModule",
    "MergeError",
    "MergeResult",
    "MergeVerificationError",
    "lora_delta",
    "merge",
    "nf4_round_trip",
    "peft_scale",
    "resolve_base",
]


class _CallableModule(types.ModuleType):
    """``qorpo.merge(...)`` calls :func:`merge`.

    Importing ``qorpo.merge`` binds the *module* as the package attribute ``qorpo.merge``, so a
    plain function export would be shadowed; a callable module works both ways.
    """

    def __call__(
        self, adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], **kwargs: Any
    ) -> MergeResult:
        return merge(adapter_dir, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

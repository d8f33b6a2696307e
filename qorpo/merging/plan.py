"""Planning the streaming merge: architecture facts (ties, 4-bit targets), matching adapter
modules to base tensors, and producing each output tensor (:func:`materialize`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

from qorpo.errors import MergeError
from qorpo.merging.adapter import Adapter, LoraModule
from qorpo.merging.checkpoint import ST_DTYPES, ST_NAMES, BaseCheckpoint, nbytes
from qorpo.quant import nf4_round_trip

# ----------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the base architecture, read off a weightless (meta-device) instance."""

    tied: dict[str, str] = field(default_factory=dict)  # tied weight -> the weight it shares
    # weights bnb 4-bit quantises -> whether stored (in, out) (Conv1D: quantised transposed)
    quantized: dict[str, bool] = field(default_factory=dict)
    conv1d: frozenset[str] = frozenset()  # modules whose weight is stored (in, out)
    keep_fp32: tuple[str, ...] = ()


def model_info(base_dir: Path, *, trust_remote_code: bool = False) -> ModelInfo:
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

    cfg = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
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
    nf4: bool = False  # pass through the NF4 round trip first (into="dequantized")
    transposed: bool = False  # stored (in, out), like Conv1D: quantised transposed

    @property
    def touched(self) -> bool:
        return bool(self.loras or self.bias_of or self.nf4) or self.replacement is not None


class Plan(NamedTuple):
    items: list[Item]
    untied: list[str]
    merged_modules: int
    replaced: int

    @property
    def nbytes(self) -> int:
        """Bytes of weights the plan writes."""
        return sum(nbytes(it.dtype, it.shape) for it in self.items)


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
    item_for = partial(_item_for, items, tied)
    for name, lora in sorted(adapter.loras.items()):
        _add_lora(item_for, keys, info, base, name, lora)
    shared = _add_replacements(item_for, keys, base, adapter)
    for target, source in tied.items():  # a shared overwrite reaches both ends of a tie
        donor = next((k for k in (source, target) if k in shared), None)
        for key in (target, source) if donor else ():
            if item_for(key).replacement is None:
                items[key].replacement = items[donor].replacement
    if dequantize:
        for key, is_conv in info.quantized.items():
            if key in items and items[key].replacement is None:
                items[key].nf4, items[key].transposed = True, is_conv
    untied = _settle_ties(items, tied, base, compute_dtype)
    return Plan(_ordered(items, base), untied, adapter.modules, len(adapter.replacements))


def _item_for(items: dict[str, Item], tied: dict[str, str], key: str) -> Item:
    """The item of ``key``; a tied weight's is created on first use, from what it shares."""
    if key not in items:
        src = items[tied[key]]
        items[key] = Item(key, src.source, src.dtype, src.shape)
    return items[key]


def _add_lora(
    item_for: Callable[[str], Item],
    keys: set[str],
    info: ModelInfo,
    base: BaseCheckpoint,
    name: str,
    lora: LoraModule,
) -> None:
    key = lora.key if lora.key in keys else _find_key(name, "weight", keys)
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


def _add_replacements(
    item_for: Callable[[str], Item], keys: set[str], base: BaseCheckpoint, adapter: Adapter
) -> set[str]:
    """Attach the adapter's whole tensors; returns the keys whose overwrite is shared by a tie."""
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
    return shared


def _is_conv1d(module: str, key: str, info: ModelInfo) -> bool:
    return module in info.conv1d or key.removesuffix(".weight") in info.conv1d


def _out_dtype(key: str, dtype: str, out_dtype: torch.dtype, info: ModelInfo) -> str:
    src = ST_DTYPES[dtype]
    if not src.is_floating_point:
        return dtype
    if src == torch.float32 and any(f".{m}." in f".{key}" for m in info.keep_fp32):
        return dtype  # the architecture pins these modules to fp32
    return ST_NAMES[out_dtype]


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
    if item.nf4:
        w = nf4_round_trip(w, transpose=item.transposed, dtype=compute_dtype)
    if item.loras or item.bias_of is not None:
        w = w.to(torch.float32, copy=True)  # never modify the caller's (adapter) tensor
        for lora in item.loras:
            lora.add_to_(w)
        if item.bias_of is not None and item.bias_of.bias is not None:
            w.add_(item.bias_of.bias.float(), alpha=item.bias_of.scale)
    return w.to(ST_DTYPES[item.dtype])

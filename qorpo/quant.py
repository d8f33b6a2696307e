"""How training quantises the base model — the one place that knows it.

Model loading (training), the merge's ``into="dequantized"`` round trip and the merge
verification's 4-bit reference all go through here. The dequantized merge is only exact while
they quantise identically, so the settings exist once: NF4, double quantisation, blocks of 64
(bitsandbytes' Linear4bit default, which transformers' ``load_in_4bit`` uses).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

NF4_QUANT_TYPE = "nf4"
NF4_DOUBLE_QUANT = True
NF4_BLOCKSIZE = 64


def fsdp_active() -> bool:
    """Launched with FSDP (accelerate launch with an FSDP config sets this for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def bnb_config(quant: str, compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for ``quant`` (4bit | 8bit | none -> None).

    Under FSDP the packed 4-bit weights are *stored* in the compute dtype: FSDP shards only
    float tensors, and flattens a unit's parameters into one tensor of one dtype (bitsandbytes
    reads the bytes the same way whatever the storage dtype, so the values are unchanged).
    """
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        storage = {"bnb_4bit_quant_storage": compute_dtype} if fsdp_active() else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=NF4_QUANT_TYPE,
                                  bnb_4bit_use_double_quant=NF4_DOUBLE_QUANT,
                                  bnb_4bit_compute_dtype=compute_dtype, **storage)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def nf4_round_trip(weight: torch.Tensor, *, transpose: bool = False,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as a bitsandbytes NF4 double-quant Linear4bit hands it to the matmul.

    Same call as transformers' ``load_in_4bit``, in the training compute dtype; Conv1D weights
    are quantised transposed, as transformers does.
    """
    import bitsandbytes.functional as bnbf

    w = weight.to(dtype)
    w = w.T.contiguous() if transpose else w
    packed, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE,
                                       compress_statistics=NF4_DOUBLE_QUANT,
                                       quant_type=NF4_QUANT_TYPE)
    out = bnbf.dequantize_4bit(packed, state).to(dtype)
    return out.T.contiguous() if transpose else out


def keep_4bit_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode without grad converts its weight, in
    place and for good, to a packed layout whose kernel (gemv_4bit) has no autograd. Any later
    backward then silently drops the gradient through the frozen base weights, i.e. to every
    LoRA layer below. The repacked kernel also computes in bf16, adding ~1e-2 logit noise that
    training never had — so the merge's 4-bit reference turns it off too. Returns how many
    modules were changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed

"""Which kernel a run will use and what its attention costs, decided before any weight loads
(the memory plan, the start table and the collator ask; attention.choice then switches the
loaded model and checks it)."""

from __future__ import annotations

from typing import Any

from qorpo.attention import FLEX, PAIR_ATTENTION
from qorpo.attention.cost import cost_per_key, skips_masked_blocks
from qorpo.hf import text_config
from qorpo.quant import fsdp_active


def flex_available() -> bool:
    """torch and transformers both have FlexAttention (torch >= 2.5, not on TPU)."""
    from transformers.utils import is_torch_flex_attn_available

    return bool(is_torch_flex_attn_available())


def planned(device: str, layout: str, requested: str | None) -> str | None:
    """Before loading: the block-skipping kernel a run on `device` will use (PAIR_ATTENTION or
    FLEX), or None when the model's own masked kernel runs. `requested`: --attn-implementation
    (None: qorpo's choice). The run itself may still fall back (attention.choice.choose)."""
    if layout == "padded":
        return None
    if device == "cpu":  # the per-pair kernels are sdpa underneath
        return PAIR_ATTENTION if requested in (None, "sdpa") else None
    if requested == FLEX:
        return FLEX
    # Under FSDP the model reaches the GPU only when the Trainer wraps it, after `choose`
    # would have to check the kernels: not preferred there (asked for, it is used unchecked).
    if device == "cuda" and requested is None and flex_available() and not fsdp_active():
        return FLEX
    return None


def attention_cost(config: Any) -> float:
    """`cost_per_key` for a loaded model's config, 0 when its kernel skips masked blocks."""
    if skips_masked_blocks(getattr(config, "_attn_implementation", None)):
        return 0.0  # pairs sharing a row never pay for each other
    return cost_per_key(getattr(text_config(config), "hidden_size", None))

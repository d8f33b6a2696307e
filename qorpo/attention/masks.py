"""The `attention_mask` a laid-out batch passes to the model, in the form its attention
implementation takes.

transformers (5.x) passes a 4-D mask through untouched to the attention function
(masking_utils._preprocess_mask_arguments): `sdpa` takes it as a boolean "may attend" mask,
`eager` ADDS it to the scores (a boolean mask there would be silently wrong: it gets
`additive_mask`), FlexAttention wants a BlockMask, and flash attention's varlen kernels can only
express block-diagonal masks — not "rejected sees the prompt but not the chosen tokens". It
detects packed sequences from position_ids only when attention_mask is None, so the 4-D mask
is always passed (a BlockMask for flex_attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qorpo.attention import FLEX, PAIR_ATTENTION
from qorpo.attention.flex import flex_block_mask
from qorpo.data.collate import Batch
from qorpo.hf import text_config
from qorpo.model import unwrap

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the (possibly wrapped) model runs now."""
    cfg = text_config(unwrap(model).config)
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean may-attend mask → additive float mask (0 where allowed, dtype min elsewhere), the
    form eager attention adds to its scores. finfo.min, not −inf: rows are never fully masked,
    and −inf − −inf would be NaN in reductions anyway."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def layer_windows(model: nn.Module) -> dict[str, int | None]:
    """{layer type: its sliding window, or None for full attention} for the model's layers,
    as transformers gives each layer its mask: by `config.layer_types` where the config has
    them (Gemma 2/3 alternate, Qwen2/3 slide per `use_sliding_window`), else one type "" for
    every layer (Mistral, Phi-3: `sliding_window` on every layer when set)."""
    cfg = text_config(unwrap(model).config)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:  # Qwen2/3: off unless asked for
        window = None
    window = int(window) if window else None
    types = getattr(cfg, "layer_types", None)
    if not types:
        return {"": window}
    return {t: window if t == "sliding_attention" else None for t in dict.fromkeys(types)}


def model_attention_mask(model: nn.Module, batch: Batch
                         ) -> torch.Tensor | BlockMask | dict[str, torch.Tensor | BlockMask]:
    """The `attention_mask` to pass for this model's attention implementation: padded → 2-D
    (the model builds its own); sdpa → (R, 1, L, L) bool; eager → additive, in the dtype of
    the model's embeddings (the scores' dtype); flex_attention → a BlockMask (O(tokens), and
    its kernels skip the blocks it masks out: the GPU's counterpart of the per-pair kernel).

    Sliding-window layers get the window in their mask (positions are pair-relative, so the
    model's own window, counted on row indices, would be wrong): one mask when the model has
    one layer type (Mistral, Llama), else a dict keyed by layer type, which transformers'
    decoders (Gemma 2/3, Qwen2/3) hand each layer by its type. The dict is passed even when
    no window reaches back that far in this batch (then its entries are one object), so the
    start-up probe's short rows already check that the model takes it."""
    if batch.layout == "padded":
        return batch.attention_mask()
    impl = attn_implementation(model)
    if impl not in ("sdpa", PAIR_ATTENTION, FLEX, "eager"):
        raise ValueError(f"the {batch.layout} layout needs sdpa, eager or flex_attention, the "
                         f"model uses {impl}; see supports_layout")
    longest = int(batch.position_ids.max()) + 1 if batch.position_ids.numel() else 0
    # a window no query of this batch reaches back past is no window: one mask fewer
    windows = {t: (w if w is not None and w < longest else None)
               for t, w in layer_windows(model).items()}
    forms = {w: _mask_form(model, impl, batch, w) for w in dict.fromkeys(windows.values())}
    if len(windows) == 1:
        return next(iter(forms.values()))
    return {t: forms[w] for t, w in windows.items()}


def _mask_form(model: nn.Module, impl: str, batch: Batch,
               window: int | None) -> torch.Tensor | BlockMask:
    if impl == FLEX:
        return flex_block_mask(batch, window)
    mask = windowed_dense_mask(batch, window)
    if impl == "eager":
        emb = unwrap(model).get_input_embeddings()
        weight = getattr(emb, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        return additive_mask(mask, dtype or torch.float32)
    return mask


def windowed_dense_mask(batch: Batch, window: int | None) -> torch.Tensor:
    """`Batch.dense_mask` (R, 1, L, L), and with `window` only keys less than `window`
    positions before the query (transformers' sliding_window_overlay: q - k < window), on the
    batch's pair-relative position_ids. Row by row, in int32: an (L, L) difference at a time."""
    mask = batch.dense_mask()
    if window:
        pos = batch.position_ids.to(torch.int32)
        for row in range(pos.shape[0]):
            mask[row, 0] &= (pos[row, :, None] - pos[row, None, :]) < window
    return mask

"""Pair-aware attention: a shared/packed batch's attention without the blocks its mask zeroes.

With a 4-D mask, SDPA computes every (query, key) block of a row and then masks it: a row
holding pairs `prompt | chosen | rejected` pays for the upper triangle, for rejected queries
against chosen keys, and (packed) for every pair against every other pair in the row. On the
CPU attention is then a quarter of a SmolLM2-135M training step at 512-token pairs
(torch.profiler; `scripts/bench_speed.py`). Here each pair is two SDPA calls instead:

* prompt + chosen, causal (`is_causal=True`: the kernel skips the upper triangle);
* rejected queries against [prompt keys | rejected keys], with a small (R, P + R) mask.

Sliding-window layers (transformers passes the layer's `sliding_window`): positions are
pair-relative, so the window is a band on them (q - k < window) in both calls' masks. Soft-capped
layers (Gemma 2's `softcap`): SDPA cannot cap scores, so those calls are written out as eager
attention does them (`capped_attention`).

The result equals the masked SDPA up to float rounding (tests/test_layout.py and
tests/test_sliding_window.py compare every layout's log-probs and LoRA gradients). transformers
has no such kernel: `register_pair_attention` registers it with its `AttentionInterface`, after
which every decoder layer's attention calls `pair_attention`; the pair boundaries reach it as a
keyword argument of the model's forward (`qorpo_spans`, added by qorpo.forward.hidden_states),
which transformers passes through every decoder layer, gradient-checkpoint recomputation
included. Whenever `qorpo_spans` is absent (padded batches, generation, a model that does not
pass keyword arguments through) the call is attention over whole rows with the batch's own mask
— which qorpo always passes — so the result is correct either way.

Used on the CPU (qorpo.attention.choice chooses): on CUDA, FlexAttention's compiled
block-sparse kernels do the same job in one call per layer instead of two small ones per pair.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qorpo.attention import PAIR_ATTENTION, cost
from qorpo.data.collate import CHOSEN, PAD, PROMPT, REJECTED, Batch


class Span(NamedTuple):
    """Where one pair lies in a laid-out batch: row, first position, and part lengths."""

    row: int
    start: int
    prompt: int
    chosen: int
    rejected: int


def pair_spans(batch: Batch) -> tuple[Span, ...]:
    """The pairs of a shared/packed batch, in row order (from its segment_ids and part)."""
    spans: list[Span] = []
    for row, (segs, parts) in enumerate(zip(batch.segment_ids.tolist(), batch.part.tolist(),
                                            strict=True)):
        pos, length = 0, len(segs)
        while pos < length and parts[pos] != PAD:  # padding only at a row's tail
            seg, counts = segs[pos], {PROMPT: 0, CHOSEN: 0, REJECTED: 0}
            end = pos
            while end < length and segs[end] == seg and parts[end] != PAD:
                counts[parts[end]] += 1
                end += 1
            spans.append(Span(row, pos, counts[PROMPT], counts[CHOSEN], counts[REJECTED]))
            pos = end
    return tuple(spans)


def pair_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None,
                   qorpo_spans: tuple[Span, ...] | None = None,
                   sliding_window: int | None = None, softcap: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query (R, heads, L, d), key/value
    (R, kv_heads, L, d) → ((R, L, heads, d), None). Called by every decoder layer's attention
    once `register_pair_attention` has run and the model is switched to it."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if (qorpo_spans is None or query.shape[2] != key.shape[2]
            or query.shape[2] < cost.MIN_ROW_LENGTH):
        if softcap is None:  # the batch's own mask carries the window (sdpa ignores the kwarg)
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
        return whole_rows_capped(module, query, key, value, attention_mask, dropout, scaling,
                                 softcap), None
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:  # GQA: each query head's K/V, as transformers' sdpa path does
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows, heads, length, dim = query.shape
    by_row: list[list[Span]] = [[] for _ in range(rows)]
    for s in qorpo_spans:
        by_row[s.row].append(s)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:  # mask None: causal
        if softcap is not None:
            return capped_attention(q, k, v, mask, scaling, dropout, softcap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=mask is None, scale=scaling)

    out = []
    # Split, never slice: a split's backward is one cat, while each slice's backward writes
    # its gradient into a zero tensor the size of the whole input. 4-D (1, heads, n, d)
    # pieces: SDPA's CPU flash kernel takes only 4-D inputs (3-D ones go to the math path).
    for q_row, k_row, v_row, spans in zip(query.split(1), key.split(1), value.split(1), by_row,
                                          strict=True):
        used = sum(s.prompt + s.chosen + s.rejected for s in spans)
        tail = [length - used] if used < length else []
        q_parts = q_row.split([n for s in spans for n in (s.prompt + s.chosen, s.rejected)]
                              + tail, dim=2)
        kv_sizes = [n for s in spans for n in (s.prompt, s.chosen, s.rejected)] + tail
        k_parts, v_parts = k_row.split(kv_sizes, dim=2), v_row.split(kv_sizes, dim=2)
        pieces = []
        for i, s in enumerate(spans):
            kp, kc, kr = k_parts[3 * i:3 * i + 3]  # (1, heads, P | C | R, d)
            vp, vc, vr = v_parts[3 * i:3 * i + 3]
            pieces.append(attend(  # (1, heads, P + C, d); positions 0 .. P + C - 1
                q_parts[2 * i], torch.cat([kp, kc], dim=2), torch.cat([vp, vc], dim=2),
                span_mask(0, s.prompt + s.chosen, s.prompt + s.chosen, sliding_window,
                          query.device)))
            pieces.append(attend(  # (1, heads, R, d): rejected query j is at position P + j
                q_parts[2 * i + 1], torch.cat([kp, kr], dim=2), torch.cat([vp, vr], dim=2),
                span_mask(s.prompt, s.rejected, s.prompt + s.rejected, sliding_window,
                          query.device, causal_ok=False)))
        if tail:  # tail padding: never attended to, never scored
            pieces.append(query.new_zeros(1, heads, tail[0], dim))
        out.append(torch.cat(pieces, dim=2))  # (1, heads, L, d)
    return torch.cat(out).transpose(1, 2).contiguous(), None  # (R, L, heads, d)


def span_mask(first: int, queries: int, keys: int, window: int | None, device: torch.device,
              causal_ok: bool = True) -> torch.Tensor | None:
    """(queries, keys) bool may-attend mask for queries at positions first .. first + queries - 1
    and keys at positions 0 .. keys - 1: key position <= query position and, with a window,
    query - key < window (transformers' sliding_window_overlay). None where plain causal
    attention is the same (`causal_ok`: queries and keys start together, no window binds)."""
    if causal_ok and first == 0 and queries == keys and (not window or keys <= window):
        return None
    q = torch.arange(first, first + queries, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    mask = k <= q
    if window:
        mask &= q - k < window
    return mask


def capped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scaling: float | None, dropout: float,
                     softcap: float) -> torch.Tensor:
    """Attention with logit soft-capping (scores → softcap · tanh(scores / softcap)), as Gemma 2's
    eager attention computes it: SDPA has no hook between its matmul and softmax. `mask`: bool
    may-attend or additive float, broadcastable to (.., Q, K); None: causal (queries are the
    last Q of the K positions)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    n_q, n_k = scores.shape[-2:]
    if mask is None:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril_(n_k - n_q)
    mask = mask[..., :n_k]
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value)


def whole_rows_capped(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
                      scaling: float | None, softcap: float) -> torch.Tensor:
    """`capped_attention` over whole rows with the batch's own mask (padded batches, short
    rows, generation): (R, L, heads, d)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = capped_attention(query, key, value, attention_mask, scaling, dropout, softcap)
    return out.transpose(1, 2).contiguous()


def register_pair_attention() -> None:
    """Make `pair_attention` transformers' attention implementation `qorpo_pairs`.

    This is the per-pair kernel's one caller in qorpo: from here on every decoder layer of a
    model switched to `qorpo_pairs` calls `pair_attention` (transformers' ALL_ATTENTION_FUNCTIONS
    lookup by config._attn_implementation), with the layer's own sliding_window/softcap and the
    forward's `qorpo_spans`. Its masks are built as for sdpa (bool, or None where causal).
    Registered again at every switch, so a patched `pair_attention` (tests) is the one used."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PAIR_ATTENTION, pair_attention)
    AttentionMaskInterface.register(PAIR_ATTENTION, sdpa_mask)


def replaces(config: Any) -> bool:
    """Whether the per-pair kernel may stand in for this model's attention: sdpa, or eager on a
    model that has eager only because sdpa cannot soft-cap its scores (Gemma 2's
    `attn_logit_softcapping`; `capped_attention` applies the cap as its eager code does)."""
    from qorpo.hf import text_config

    current = getattr(config, "_attn_implementation", None)
    capped = getattr(text_config(config), "attn_logit_softcapping", None) is not None
    return current == "sdpa" or (current == "eager" and capped)


def use_pair_attention(model: nn.Module) -> bool:
    """Switch a model (that `replaces` allows) to pair-aware attention. Returns whether the
    model now uses it. Called by qorpo.attention.choice.choose at build time."""
    register_pair_attention()
    if not replaces(model.config):
        return False
    try:
        model.set_attn_implementation(PAIR_ATTENTION)
    except (ValueError, AttributeError):  # a model without the attention interface
        return False
    return getattr(model.config, "_attn_implementation", None) == PAIR_ATTENTION

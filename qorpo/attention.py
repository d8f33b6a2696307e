"""Pair-aware attention: a shared/packed batch's attention without the blocks its mask zeroes.

With a 4-D mask, SDPA computes every (query, key) block of a row and then masks it: a row
holding pairs `prompt | chosen | rejected` pays for the upper triangle, for rejected queries
against chosen keys, and (packed) for every pair against every other pair in the row. On the
CPU attention is then a quarter of a SmolLM2-135M training step at 512-token pairs
(torch.profiler; `scripts/bench_speed.py`). Here each pair is two SDPA calls instead:

* prompt + chosen, causal (`is_causal=True`: the kernel skips the upper triangle);
* rejected queries against [prompt keys | rejected keys], with a small (R, P + R) mask.

The result equals the masked SDPA up to float rounding (tests/test_layout.py compares every
layout's log-probs and LoRA gradients). transformers has no such kernel: its attention
interface lets us register one (`AttentionInterface`), and the pair boundaries reach it as a
keyword argument of the model's forward (`qorpo_spans`), which transformers passes through
every decoder layer to the attention function, gradient-checkpoint recomputation included.
Whenever `qorpo_spans` is absent (padded batches, generation, a model that does not pass
keyword arguments through) the call is plain `sdpa` with the batch's own mask — which qorpo
always passes — so the result is correct either way.

Used on the CPU (qorpo.kernels chooses): on CUDA, FlexAttention's compiled block-sparse
kernels do the same job in one call per layer instead of two small ones per pair.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qorpo.data.collate import CHOSEN, PAD, PROMPT, REJECTED, Batch

NAME = "qorpo_pairs"  # the attention implementation's registered name
# Rows shorter than this take the one masked kernel: the wasted blocks of a short row cost less
# than a Python loop of per-pair calls (2-layer test model, 96-token rows: the loop was ~4 ms
# of a 36 ms step; at 256 tokens masked and causal kernels cost about the same per block).
MIN_ROW_LENGTH = 256


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
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query (R, heads, L, d), key/value
    (R, kv_heads, L, d) → ((R, L, heads, d), None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if (qorpo_spans is None or kwargs.get("sliding_window") or kwargs.get("softcap") is not None
            or query.shape[2] != key.shape[2] or query.shape[2] < MIN_ROW_LENGTH):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:  # GQA: each query head's K/V, as transformers' sdpa path does
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows, heads, length, dim = query.shape
    by_row: list[list[Span]] = [[] for _ in range(rows)]
    for s in qorpo_spans:
        by_row[s.row].append(s)
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
            pieces.append(F.scaled_dot_product_attention(  # (1, heads, P + C, d)
                q_parts[2 * i], torch.cat([kp, kc], dim=2), torch.cat([vp, vc], dim=2),
                dropout_p=dropout, is_causal=True, scale=scaling))
            # rejected query j sees every prompt key and rejected keys 0..j: col <= j + P
            mask = torch.ones(s.rejected, s.prompt + s.rejected, dtype=torch.bool,
                              device=query.device).tril_(diagonal=s.prompt)
            pieces.append(F.scaled_dot_product_attention(  # (1, heads, R, d)
                q_parts[2 * i + 1], torch.cat([kp, kr], dim=2), torch.cat([vp, vr], dim=2),
                attn_mask=mask, dropout_p=dropout, scale=scaling))
        if tail:  # tail padding: never attended to, never scored
            pieces.append(query.new_zeros(1, heads, tail[0], dim))
        out.append(torch.cat(pieces, dim=2))  # (1, heads, L, d)
    return torch.cat(out).transpose(1, 2).contiguous(), None  # (R, L, heads, d)


def use_pair_attention(model: nn.Module) -> bool:
    """Switch a model from `sdpa` to pair-aware attention (its masks are still built as for
    sdpa). Returns whether the model now uses it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, pair_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):  # a model without the attention interface
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME

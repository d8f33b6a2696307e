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

Used on the CPU only for now: on CUDA the many small calls per layer have not been measured
against one masked kernel (or FlexAttention's block mask); the `--device cuda` preset of
scripts/bench_speed.py is the check to run.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qorpo.data.collate import CHOSEN, PAD, PROMPT, REJECTED, Batch

NAME = "qorpo_pairs"  # the attention implementation's registered name


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
            or query.shape[2] != key.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:  # GQA: each query head's K/V, as transformers' sdpa path does
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows, heads, length, dim = query.shape
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    used = [0] * rows
    for s in qorpo_spans:
        a = s.start
        b = a + s.prompt + s.chosen  # the rejected response starts here
        e = b + s.rejected
        # 4-D (1, heads, n, d) slices: SDPA's CPU flash kernel takes only 4-D inputs (3-D
        # ones silently go to the slower math path)
        q, k, v = (t[s.row:s.row + 1] for t in (query, key, value))  # (1, heads, L, d)
        pieces[s.row].append(F.scaled_dot_product_attention(  # (1, heads, P + C, d)
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout, is_causal=True,
            scale=scaling))
        keys = torch.cat([k[:, :, a:a + s.prompt], k[:, :, b:e]], dim=2)  # (1, heads, P + R, d)
        values = torch.cat([v[:, :, a:a + s.prompt], v[:, :, b:e]], dim=2)
        # rejected query j sees every prompt key and rejected keys 0..j: col <= j + P
        mask = torch.ones(s.rejected, s.prompt + s.rejected, dtype=torch.bool,
                          device=query.device).tril_(diagonal=s.prompt)
        pieces[s.row].append(F.scaled_dot_product_attention(  # (1, heads, R, d)
            q[:, :, b:e], keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling))
        used[s.row] = e
    out = []
    for row in range(rows):
        if used[row] < length:  # tail padding: never attended to, never scored
            pieces[row].append(query.new_zeros(1, heads, length - used[row], dim))
        out.append(torch.cat(pieces[row], dim=2))  # (1, heads, L, d)
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

"""FlexAttention's BlockMask for the shared/packed layouts (the GPU's block-skipping kernel).

A BlockMask is a few bytes per 128 x 128 tile instead of a dense (R, L, L) mask, and
FlexAttention's kernels skip the tiles it rules out: empty tiles cost nothing, full ones need
no mask_mod call, partial ones evaluate `flex_mask_mod` per (query, key).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from qorpo.data.collate import CHOSEN, PAD, REJECTED, Batch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

FLEX_BLOCK = 128  # FlexAttention's default sparse block (query and key/value tiles)


def flex_block_mask(batch: Batch, window: int | None = None) -> BlockMask:
    """A FlexAttention BlockMask for a shared/packed batch, on the batch's device; with
    `window`, for a sliding-window layer (a query sees keys less than `window` positions back).

    Built from the (R, L) `segment_ids`/`part` only, in O(R · (L/128)²) memory: torch's
    create_block_mask (uncompiled) would evaluate the mask_mod on the dense (R, L, L) grid,
    with int64 intermediates — 8 bytes per (query, key), more than the dense bool mask this
    replaces. `flex_blocks` classifies the 128 × 128 tiles instead (tests/test_flex.py checks
    it against create_block_mask). transformers' flex_attention_forward takes a BlockMask passed
    as `attention_mask` directly (a tensor there is ADDED to the scores as a float score_mod).
    One per micro-batch: every layer, and the recomputation under gradient checkpointing, get
    the same object (one per layer type with sliding-window layers: qorpo.attention.masks).
    Gemma 2's soft-capping is not the mask's: transformers' flex_attention_forward applies it
    in its score_mod.
    """
    from torch.nn.attention.flex_attention import BlockMask

    seg, part = batch.segment_ids, batch.part.long()
    length = seg.shape[1]
    partial, full = flex_blocks(seg, part, FLEX_BLOCK)  # (R, nQ, nK) each
    mask_mod = flex_mask_mod(seg, part)
    if window:
        near, within = window_tiles(batch.position_ids, FLEX_BLOCK, window)
        full, partial = full & within, (partial | full) & near & ~(full & within)
        mask_mod = flex_mask_mod(seg, part, batch.position_ids, window)

    def as_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # per query tile: how many key tiles, and their indices first (the rest is unused)
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = as_indices(partial)  # (R, 1, nQ), (R, 1, nQ, nK)
    full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def flex_blocks(segment_ids: torch.Tensor, part: torch.Tensor,
                block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): (R, nQ, nK) bool tiles of the may-attend rule of `Batch.dense_mask`.
    A tile is empty when no query in it may see a key in it, full when every one may, partial
    otherwise (the kernel evaluates the mask_mod there and skips empty tiles).

    Exact, from per-tile ranges of run numbers: segments are contiguous runs of a row (tail
    padding its own segment), numbered here in row order, and each has at least one prompt,
    chosen and rejected token, so the runs of one part that a tile holds are a contiguous range
    too. Below the diagonal
    every key precedes every query: a tile pair is non-empty when non-rejected queries share a
    segment with any key, or rejected queries with a non-chosen key. A diagonal tile always is
    (each token sees itself)."""
    rows, length = segment_ids.shape
    n = -(-length // block)
    extra = n * block - length  # the last tile's missing positions repeat the last column
    # number the runs of each row in order (segment ids are pair numbers, in any order)
    runs = torch.cat([torch.zeros_like(segment_ids[:, :1]),
                      (segment_ids[:, 1:] != segment_ids[:, :-1]).long()], 1).cumsum(1)
    seg = torch.cat([runs, runs[:, -1:].expand(rows, extra)], 1).view(rows, n, block)
    prt = torch.cat([part, part[:, -1:].expand(rows, extra)], 1).view(rows, n, block)
    pad, rej, cho = prt == PAD, prt == REJECTED, prt == CHOSEN
    big = torch.iinfo(seg.dtype).max

    def span(where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (R, n) each; lo > hi
        return (seg.masked_fill(~where, big).amin(-1),  # when the tile has no such token
                seg.masked_fill(~where, -big).amax(-1))

    def overlap(q: tuple[torch.Tensor, torch.Tensor],
                k: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # (R, nQ, nK)
        return (q[0][:, :, None].maximum(k[0][:, None, :])
                <= q[1][:, :, None].minimum(k[1][:, None, :]))

    real = ~pad
    has_pad = pad.any(-1)
    below = overlap(span(real & ~rej), span(real)) | overlap(span(rej), span(real & ~cho))
    below |= has_pad[:, :, None] & has_pad[:, None, :]  # padding sees padding
    idx = torch.arange(n, device=seg.device)
    lower = idx[:, None] > idx[None, :]  # (nQ, nK): every key before every query
    nonempty = (below & lower) | torch.eye(n, dtype=torch.bool, device=seg.device)
    # full: one segment in both tiles (the same one), no rejected query and chosen key, below
    # the diagonal, and no position past the end
    first = seg[..., 0]  # (R, n)
    single = (seg == first[..., None]).all(-1)
    whole = torch.ones(n, dtype=torch.bool, device=seg.device)
    whole[-1] = extra == 0
    full = (lower & whole[:, None] & whole[None, :]
            & single[:, :, None] & single[:, None, :] & (first[:, :, None] == first[:, None, :])
            & ~(rej.any(-1)[:, :, None] & cho.any(-1)[:, None, :]))
    return nonempty & ~full, full


def flex_mask_mod(segment_ids: torch.Tensor, part: torch.Tensor,
                  positions: torch.Tensor | None = None, window: int | None = None) -> Any:
    """The may-attend rule of `Batch.dense_mask` as a FlexAttention mask_mod(b, h, q, kv); with
    `window` (and the batch's position_ids), only keys less than `window` positions back."""

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        same = segment_ids[b, q] == segment_ids[b, kv]
        blind = (part[b, q] == REJECTED) & (part[b, kv] == CHOSEN)
        return same & (kv <= q) & ~blind

    if not window:
        return mask_mod
    if positions is None:
        raise ValueError("a sliding-window mask_mod needs the batch's position_ids")

    def windowed(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return mask_mod(b, h, q, kv) & (positions[b, q] - positions[b, kv] < window)

    return windowed


def window_tiles(positions: torch.Tensor, block: int,
                 window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(near, within): (R, nQ, nK) bool. `near`: some query of the tile may be less than
    `window` positions after some key of the other (else no pair of them is in the window:
    the tile is empty); `within`: every query is (a full tile stays full). From per-tile
    position ranges, so `near` may keep a tile that turns out empty: never one that is not."""
    rows, length = positions.shape
    n = -(-length // block)
    pos = torch.cat([positions, positions[:, -1:].expand(rows, n * block - length)], 1)
    pos = pos.view(rows, n, block)
    lo, hi = pos.amin(-1), pos.amax(-1)  # (R, n)
    near = lo[:, :, None] - hi[:, None, :] < window
    within = hi[:, :, None] - lo[:, None, :] < window
    return near, within


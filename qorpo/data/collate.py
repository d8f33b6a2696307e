"""Pairs -> one micro-batch, in one of three layouts, plus what to score in it.

Each pair = (prompt ids, chosen response ids, rejected response ids):

* ``padded``  two rows per pair, ``prompt|chosen`` and ``prompt|rejected``, right-padded to the
  longest: (2B, T) and a 2-D 0/1 mask; the model builds its own causal mask. Every peer's way.
* ``shared``  one row per pair, ``prompt|chosen|rejected``: the prompt runs once. Position ids
  are 0 … P+C−1 for prompt+chosen and P … P+R−1 for rejected (the rejected tokens sit where
  they sit in ``prompt|rejected``: RoPE sees the same positions); attention is causal except
  that rejected tokens never see chosen tokens. Rows are padded at the tail to the longest.
* ``packed``  the shared sequences of several pairs in one row (block-diagonal between pairs),
  first-fit by length into rows as long as the longest pair; padding only at a row's tail.

`batch_size` means pairs per micro-batch in every layout, so every layout trains on the same
pairs in the same steps. Every layout yields the same qorpo.loss.ScoreSpec (in the order
qorpo.loss.padded_spec lists tokens), so the loss does not know the layout, and on the padded
layout the two agree bit for bit. The one position that differs between layouts: the FIRST
rejected token is predicted by the LAST PROMPT token (in a shared row the token before it is the
last chosen token, which the rejected sequence must never see).

Masks for ``shared``/``packed`` are not stored: a row's structure is two small (R, L) tensors
(`segment_ids`, `part`) and the (R, 1, L, L) boolean mask is built from them where it is needed
(`Batch.dense_mask`), after the cheap (R, L) transfer to the device. qorpo.forward's
model_attention_mask gives each attention kernel its form (qorpo.kernels chooses the kernel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch

from qorpo.loss import ScoreSpec

Layout = Literal["padded", "shared", "packed"]
LAYOUTS: tuple[str, ...] = ("padded", "shared", "packed")

# `Batch.part` codes: what each position of a row holds.
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
PAD_SEGMENT = -1  # `Batch.segment_ids` of tail padding (a causal block of its own)

Pair = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt, chosen, rejected) ids


@dataclass(frozen=True)
class Batch:
    """B preference pairs laid out for one forward pass, plus how to score them.

    R rows of L positions. Scored tokens (N of them) are described layout-independently by
    the `score_*` tensors; see the module docstring.
    """

    layout: str
    input_ids: torch.Tensor  # (R, L) long
    position_ids: torch.Tensor  # (R, L) long
    segment_ids: torch.Tensor  # (R, L) long: tokens may attend only within their segment
    part: torch.Tensor  # (R, L) int8: PROMPT | CHOSEN | REJECTED | PAD
    score_index: torch.Tensor  # (N,) long: flat index into (R·L) of the PREDICTING position
    score_target: torch.Tensor  # (N,) long: the scored token id
    score_seq: torch.Tensor  # (N,) long: sequence of the token, chosen i = i, rejected i = B+i
    score_response: torch.Tensor  # (N,) bool: counts toward ℓw / ℓl
    score_sft: torch.Tensor  # (N,) bool: counts toward the NLL
    num_pairs: int  # B
    unique_tokens: int  # Σ P+C+R: each prompt once; the same in every layout
    input_tokens: int  # non-pad positions the model runs (padded: Σ 2P+C+R)
    pad_tokens: int  # R·L − input_tokens

    num_sft_tokens: int  # tokens in the NLL (the trainer sums them over a window)

    @property
    def spec(self) -> ScoreSpec:
        """What to score, for qorpo.loss.score_logps."""
        return ScoreSpec(self.score_index, self.score_target, self.score_seq,
                         self.score_response, self.score_sft, self.num_pairs)

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def dense_mask(self) -> torch.Tensor:
        """(R, 1, L, L) bool, True = query may attend to key: same segment, causal, and no
        rejected query sees a chosen key. Tail padding forms its own causal segment, so every
        query row attends to at least itself (a fully masked row would give NaN in sdpa, and
        NaN in unused outputs still poisons gradients through 0·NaN)."""
        seg, part = self.segment_ids, self.part
        length = seg.shape[1]
        # In place, so the peak is two (R, L, L) bool tensors: R·L² bytes each.
        mask = seg[:, :, None] == seg[:, None, :]  # (R, L, L) [q, kv]: same segment
        mask &= torch.ones(length, length, dtype=torch.bool, device=seg.device).tril_()
        blind = (part == REJECTED)[:, :, None] & (part == CHOSEN)[:, None, :]  # (R, L, L)
        mask &= ~blind
        return mask[:, None]  # (R, 1, L, L)

    def attention_mask(self) -> torch.Tensor:
        """What the model takes as `attention_mask` under sdpa: padded → (R, L) 0/1 (the model
        builds its causal mask), shared/packed → `dense_mask()` (R, 1, L, L) bool."""
        if self.layout == "padded":
            return (self.part != PAD).long()  # (R, L)
        return self.dense_mask()

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (what transformers.Trainer moves to the device); see `from_dict`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Batch:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def pairs_from_features(features: Sequence[Mapping[str, Any]]) -> list[Pair]:
    """qorpo.data examples (chosen/rejected_input_ids + *_response_start) → pairs."""
    pairs: list[Pair] = []
    for k, f in enumerate(features):
        chosen, rejected = list(f["chosen_input_ids"]), list(f["rejected_input_ids"])
        start = int(f["chosen_response_start"])
        if int(f["rejected_response_start"]) != start or chosen[:start] != rejected[:start]:
            raise ValueError(f"example {k}: chosen and rejected do not share the prompt; the "
                             "shared/packed layouts need one prompt per pair")
        pairs.append((chosen[:start], chosen[start:], rejected[start:]))
    return pairs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: pair indices per row, every row's total ≤ capacity. Longest first
    is what makes first-fit pack well; ties keep input order, so the result is deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


# How much one position of a row costs, relative to its linear layers, per position of the row
# it attends over: attention is ~4·H FLOPs per (query, key) per layer, the linear layers ~2·P
# per token (P = parameters per layer, ~12·H² for a Llama block), so 4H / 2P ≈ 1 / (6 H). A
# custom mask stops kernels from skipping masked blocks, so a row of length L costs about
# L · (1 + L · ATTENTION_COST) — what `choose_capacity` minimises. 1/(6·576) for SmolLM2-135M;
# a bigger model's is smaller (longer rows pay off more); the collator gets it from the model.
DEFAULT_ATTENTION_COST = 1 / (6 * 576)


def choose_capacity(lengths: list[int], multiple: int = 8,
                    attention_cost: float = DEFAULT_ATTENTION_COST) -> int:
    """The row capacity that lays `lengths` out cheapest: rows x L (padding included, every
    row is L long) times the attention term, over capacities from the longest pair to twice
    it (longer rows cost more in attention than the padding they save)."""
    longest = max(lengths)
    best, best_cost = longest, float("inf")
    for cap in sorted({min(2 * longest, longest + n) for n in [0, *lengths]}):
        rows = pack_rows(lengths, cap)
        length = _round_up(max(sum(lengths[i] for i in r) for r in rows), multiple)
        cost = len(rows) * length * (1 + length * attention_cost)
        if cost < best_cost:
            best, best_cost = cap, cost
    return best


def build_batch(
    pairs: Sequence[Pair],
    layout: Layout = "padded",
    *,
    pad_token_id: int = 0,
    sft_on_prompt: bool = False,
    max_row_tokens: int | None = None,
    pad_to_multiple_of: int = 1,
    attention_cost: float = DEFAULT_ATTENTION_COST,
) -> Batch:
    """Lay B pairs out as `layout` and describe what to score.

    max_row_tokens: packed only, the row capacity; default: `choose_capacity` (between the
    longest pair's P+C+R and twice it, whichever lays the pairs out cheapest for a model whose
    `attention_cost` is given). A pair longer than it is an error.
    pad_to_multiple_of: L is rounded up to it (qorpo's collator uses 8).
    Scoring is `qorpo.loss.pair_logps`'s: every response token of both sides; with
    `sft_on_prompt` also the chosen sequence's prompt tokens after the first (NLL only).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not pairs:
        raise ValueError("no pairs to lay out")
    ps = [[int(t) for t in p] for p, _, _ in pairs]
    cs = [[int(t) for t in c] for _, c, _ in pairs]
    rs = [[int(t) for t in r] for _, _, r in pairs]
    for k, (p, c, r) in enumerate(zip(ps, cs, rs, strict=True)):
        if not p or not c or not r:
            raise ValueError(f"pair {k}: prompt, chosen and rejected need at least one token each "
                             f"(got {len(p)}, {len(c)}, {len(r)}); the first response token is "
                             "predicted from the last prompt token")
    b = len(pairs)
    multiple = max(1, int(pad_to_multiple_of))

    # Where each pair goes: for padded, chosen i → row i and rejected i → row B+i, each at
    # offset 0; otherwise pair i → (row, offset) with prompt|chosen|rejected contiguous.
    shared_len = [len(p) + len(c) + len(r) for p, c, r in zip(ps, cs, rs, strict=True)]
    if layout == "padded":
        used = [len(p) + len(c) for p, c in zip(ps, cs, strict=True)]
        used += [len(p) + len(r) for p, r in zip(ps, rs, strict=True)]
        n_rows, length = 2 * b, _round_up(max(used), multiple)
    else:
        if layout == "shared":
            row_pairs = [[i] for i in range(b)]
        else:
            capacity = (choose_capacity(shared_len, multiple, attention_cost)
                        if max_row_tokens is None else int(max_row_tokens))
            if max(shared_len) > capacity:
                raise ValueError(f"a pair has {max(shared_len)} tokens (prompt + both responses), "
                                 f"more than max_row_tokens={capacity}")
            row_pairs = pack_rows(shared_len, capacity)
        place: list[tuple[int, int]] = [(0, 0)] * b  # pair → (row, offset)
        used = []
        for r, members in enumerate(row_pairs):
            offset = 0
            for i in members:
                place[i] = (r, offset)
                offset += shared_len[i]
            used.append(offset)
        n_rows, length = len(row_pairs), _round_up(max(used), multiple)

    input_ids = torch.full((n_rows, length), int(pad_token_id), dtype=torch.long)  # (R, L)
    position_ids = torch.zeros((n_rows, length), dtype=torch.long)  # (R, L)
    segment_ids = torch.full((n_rows, length), PAD_SEGMENT, dtype=torch.long)  # (R, L)
    part = torch.full((n_rows, length), PAD, dtype=torch.int8)  # (R, L)

    def put(row: int, start: int, ids: list[int], pos0: int, seg: int, what: int) -> None:
        end = start + len(ids)
        input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
        position_ids[row, start:end] = torch.arange(pos0, pos0 + len(ids))
        segment_ids[row, start:end] = seg
        part[row, start:end] = what

    # Flat (R·L) index of the hidden state at position `pos` of a pair's chosen / rejected
    # sequence (prompt at positions 0…P−1, response from P on), for either layout.
    def chosen_at(i: int, pos: torch.Tensor) -> torch.Tensor:
        row, off = (i, 0) if layout == "padded" else place[i]
        return row * length + off + pos

    def rejected_at(i: int, pos: torch.Tensor) -> torch.Tensor:
        if layout == "padded":
            return (b + i) * length + pos
        row, off = place[i]
        c = len(cs[i])
        # prompt positions are the shared prompt's; response positions sit after the chosen
        return row * length + off + torch.where(pos < len(ps[i]), pos, pos + c)

    for i, (p, c, r) in enumerate(zip(ps, cs, rs, strict=True)):
        if layout == "padded":
            put(i, 0, p, 0, i, PROMPT)
            put(i, len(p), c, len(p), i, CHOSEN)
            put(b + i, 0, p, 0, b + i, PROMPT)
            put(b + i, len(p), r, len(p), b + i, REJECTED)
        else:
            row, off = place[i]
            put(row, off, p, 0, i, PROMPT)
            put(row, off + len(p), c, len(p), i, CHOSEN)
            put(row, off + len(p) + len(c), r, len(p), i, REJECTED)
    # Padding: positions keep counting (padded: what the model would use by default; elsewhere
    # harmless, the padding is its own segment) — any bounded value would do.
    for row in range(n_rows):
        pad = part[row] == PAD
        if pad.any():
            first = int(pad.nonzero()[0])
            position_ids[row, first:] = torch.arange(length - first) + (
                first if layout == "padded" else 0)

    # The scoring spec, in pair_logps's order: chosen 0…B−1, then rejected 0…B−1, each left to
    # right. Token at sequence position t is predicted by the hidden state at t−1.
    index, target, seq, resp, sft = [], [], [], [], []
    for i, (p, c, _) in enumerate(zip(ps, cs, rs, strict=True)):
        n_p = len(p)
        first = 1 if sft_on_prompt else n_p
        t = torch.arange(first, n_p + len(c))  # scored positions of the chosen sequence
        index.append(chosen_at(i, t - 1))
        target.append(torch.tensor((p + c)[first:], dtype=torch.long))
        seq.append(torch.full_like(t, i))
        resp.append(t >= n_p)
        sft.append(torch.ones_like(t, dtype=torch.bool))
    for i, (p, _, r) in enumerate(zip(ps, cs, rs, strict=True)):
        n_p = len(p)
        t = torch.arange(n_p, n_p + len(r))
        # t−1 = P−1 for the first rejected token: the last prompt token (the boundary)
        index.append(rejected_at(i, t - 1))
        target.append(torch.tensor(r, dtype=torch.long))
        seq.append(torch.full_like(t, b + i))
        resp.append(torch.ones_like(t, dtype=torch.bool))
        sft.append(torch.zeros_like(t, dtype=torch.bool))

    input_tokens = int((part != PAD).sum())
    score_sft = torch.cat(sft)
    return Batch(
        layout=layout, input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids,
        part=part, score_index=torch.cat(index), score_target=torch.cat(target),
        score_seq=torch.cat(seq), score_response=torch.cat(resp), score_sft=score_sft,
        num_pairs=b, unique_tokens=sum(shared_len), input_tokens=input_tokens,
        pad_tokens=n_rows * length - input_tokens, num_sft_tokens=int(score_sft.sum()),
    )

class PairCollator:
    """qorpo.data examples -> a micro-batch dict for the Trainer (`Batch.to_dict()` + `row`, the
    pairs' row numbers in the data file). `Batch.from_dict` turns it back into a Batch."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int = 8, *,
                 layout: Layout = "padded", sft_on_prompt: bool = False,
                 max_row_tokens: int | None = None,
                 attention_cost: float = DEFAULT_ATTENTION_COST) -> None:
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)  # masked anyway
        self.multiple = max(1, pad_to_multiple_of)  # fewer distinct shapes; tensor cores
        self.layout, self.sft_on_prompt = layout, sft_on_prompt
        self.max_row_tokens, self.attention_cost = max_row_tokens, attention_cost

    def batch(self, features: Sequence[Mapping[str, Any]]) -> Batch:
        return build_batch(pairs_from_features(features), self.layout,
                           pad_token_id=self.pad_token_id, sft_on_prompt=self.sft_on_prompt,
                           max_row_tokens=self.max_row_tokens,
                           pad_to_multiple_of=self.multiple, attention_cost=self.attention_cost)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out = self.batch(features).to_dict()
        out["row"] = torch.tensor([int(f["row"]) for f in features], dtype=torch.long)  # (B,)
        return out

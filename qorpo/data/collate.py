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

Where each pair goes (rows, offsets, row length) is qorpo.data.placement's, torch-free and
shared with the memory plan; this module turns a placement into tensors.

`batch_size` means pairs per micro-batch in every layout, so every layout trains on the same
pairs in the same steps. Every layout yields the same qorpo.loss.ScoreSpec (in the order
qorpo.loss.padded_spec lists tokens), so the loss does not know the layout, and on the padded
layout the two agree bit for bit. The one position that differs between layouts: the FIRST
rejected token is predicted by the LAST PROMPT token (in a shared row the token before it is the
last chosen token, which the rejected sequence must never see).

Masks for ``shared``/``packed`` are not stored: a row's structure is two small (R, L) tensors
(`segment_ids`, `part`) and the (R, 1, L, L) boolean mask is built from them where it is needed
(`Batch.dense_mask`), after the cheap (R, L) transfer to the device.
qorpo.attention.masks.model_attention_mask gives each kernel its form (qorpo.attention.choice
chooses the kernel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, NamedTuple

import torch

from qorpo.attention.cost import DEFAULT_ATTENTION_COST  # cost per (query, key); see there
from qorpo.data.placement import PAD_MULTIPLE, Placement, Seat, place
from qorpo.loss import ScoreSpec

__all__ = ["CHOSEN", "PAD", "PAD_SEGMENT", "PROMPT", "REJECTED", "Batch", "Layout", "Pair",
           "PairCollator", "build_batch", "pairs_from_features"]

Layout = Literal["padded", "shared", "packed"]

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

    Where each pair goes is qorpo.data.placement.place's (max_row_tokens, pad_to_multiple_of,
    attention_cost: see there; qorpo's collator pads to PAD_MULTIPLE); this fills the rows.
    Scoring is `qorpo.loss.pair_logps`'s: every response token of both sides; with
    `sft_on_prompt` also the chosen sequence's prompt tokens after the first (NLL only).
    """
    tokens = _token_lists(pairs)
    where = place([(len(p), len(c), len(r)) for p, c, r in tokens], layout,
                  sft_on_prompt=sft_on_prompt, max_row_tokens=max_row_tokens,
                  pad_to_multiple_of=pad_to_multiple_of, attention_cost=attention_cost)
    rows = _fill_rows(where, tokens, int(pad_token_id))
    index, target, seq, resp, sft = _score_tensors(where, tokens, sft_on_prompt)
    return Batch(
        layout=layout, input_ids=rows.input_ids, position_ids=rows.position_ids,
        segment_ids=rows.segment_ids, part=rows.part, score_index=index, score_target=target,
        score_seq=seq, score_response=resp, score_sft=sft, num_pairs=len(tokens),
        unique_tokens=where.unique_tokens, input_tokens=where.input_tokens,
        pad_tokens=where.pad_tokens, num_sft_tokens=where.sft_tokens,
    )


TokenLists = list[tuple[list[int], list[int], list[int]]]


def _token_lists(pairs: Sequence[Pair]) -> TokenLists:
    """The pairs as plain int lists; each part needs a token (the first response token is
    predicted from the last prompt token)."""
    out = [([int(t) for t in p], [int(t) for t in c], [int(t) for t in r]) for p, c, r in pairs]
    for k, (p, c, r) in enumerate(out):
        if not p or not c or not r:
            raise ValueError(f"pair {k}: prompt, chosen and rejected need at least one token each "
                             f"(got {len(p)}, {len(c)}, {len(r)}); the first response token is "
                             "predicted from the last prompt token")
    return out


class _Rows(NamedTuple):
    input_ids: torch.Tensor  # (R, L) long
    position_ids: torch.Tensor  # (R, L) long
    segment_ids: torch.Tensor  # (R, L) long
    part: torch.Tensor  # (R, L) int8

    def put(self, seat: Seat, ids: list[int], pos0: int, segment: int, what: int) -> None:
        row, start, end = seat.row, seat.start, seat.start + len(ids)
        self.input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
        self.position_ids[row, start:end] = torch.arange(pos0, pos0 + len(ids))
        self.segment_ids[row, start:end] = segment
        self.part[row, start:end] = what


def _fill_rows(where: Placement, tokens: TokenLists, pad_token_id: int) -> _Rows:
    """The (R, L) tensors with every pair's tokens in its seats."""
    shape = (where.rows, where.length)
    rows = _Rows(torch.full(shape, pad_token_id, dtype=torch.long),
                 torch.zeros(shape, dtype=torch.long),
                 torch.full(shape, PAD_SEGMENT, dtype=torch.long),
                 torch.full(shape, PAD, dtype=torch.int8))
    for seats, (p, c, r) in zip(where.pairs, tokens, strict=True):
        rows.put(seats.prompt, p, 0, seats.chosen_segment, PROMPT)
        rows.put(seats.chosen, c, len(p), seats.chosen_segment, CHOSEN)
        if seats.rejected_prompt != seats.prompt:  # padded: the rejected row's own prompt
            rows.put(seats.rejected_prompt, p, 0, seats.rejected_segment, PROMPT)
        rows.put(seats.rejected, r, len(p), seats.rejected_segment, REJECTED)
    # Padding: positions keep counting (padded: what the model would use by default; elsewhere
    # harmless, the padding is its own segment) — any bounded value would do.
    for row in range(where.rows):
        pad = rows.part[row] == PAD
        if pad.any():
            first = int(pad.nonzero()[0])
            rows.position_ids[row, first:] = torch.arange(where.length - first) + (
                first if where.layout == "padded" else 0)
    return rows


def _flat_index(where: Placement, prompt: Seat, response: Seat, n_prompt: int,
                pos: torch.Tensor) -> torch.Tensor:
    """Flat (R·L) index of position `pos` of a sequence that reads `prompt` (positions
    0…P−1) then `response` (P on), wherever the layout put them."""
    length = where.length
    return torch.where(pos < n_prompt, prompt.row * length + prompt.start + pos,
                       response.row * length + response.start + pos - n_prompt)


def _score_tensors(where: Placement, tokens: TokenLists,
                   sft_on_prompt: bool) -> tuple[torch.Tensor, ...]:
    """(index, target, seq, response, sft), in pair_logps's order: chosen 0…B−1, then rejected
    0…B−1, each left to right. Token at sequence position t is predicted by the hidden state
    at t−1."""
    b = len(tokens)
    index, target, seq, resp, sft = [], [], [], [], []
    for i, (seats, (p, c, _)) in enumerate(zip(where.pairs, tokens, strict=True)):
        n_p = len(p)
        first = 1 if sft_on_prompt else n_p
        t = torch.arange(first, n_p + len(c))  # scored positions of the chosen sequence
        index.append(_flat_index(where, seats.prompt, seats.chosen, n_p, t - 1))
        target.append(torch.tensor((p + c)[first:], dtype=torch.long))
        seq.append(torch.full_like(t, i))
        resp.append(t >= n_p)
        sft.append(torch.ones_like(t, dtype=torch.bool))
    for i, (seats, (p, _, r)) in enumerate(zip(where.pairs, tokens, strict=True)):
        n_p = len(p)
        t = torch.arange(n_p, n_p + len(r))
        # t−1 = P−1 for the first rejected token: the last prompt token (the boundary)
        index.append(_flat_index(where, seats.rejected_prompt, seats.rejected, n_p, t - 1))
        target.append(torch.tensor(r, dtype=torch.long))
        seq.append(torch.full_like(t, b + i))
        resp.append(torch.ones_like(t, dtype=torch.bool))
        sft.append(torch.zeros_like(t, dtype=torch.bool))
    return tuple(torch.cat(x) for x in (index, target, seq, resp, sft))


class PairCollator:
    """qorpo.data examples -> a micro-batch dict for the Trainer (`Batch.to_dict()` + `row`, the
    pairs' row numbers in the data file). `Batch.from_dict` turns it back into a Batch."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int = PAD_MULTIPLE, *,
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

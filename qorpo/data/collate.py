"""Pairs -> the padded (2B, T) batch the trainer scores (rows [0:B] chosen, [B:2B] rejected)."""

from __future__ import annotations

from typing import Any

import torch


class PairCollator:
    """Batch of B pairs -> input_ids/attention_mask/response_mask (2B, T), row (B,).

    Rows [0:B] are the chosen sequences, [B:2B] the rejected ones of the same pairs. Right
    padding; T is rounded up to a multiple of `pad_to_multiple_of` (8: tensor-core friendly
    shapes, fewer distinct shapes). Masks come from positions, never from comparing ids with
    the pad id (pad may equal EOS, and that EOS is a scored response token).
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int = 8) -> None:
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)  # masked anyway
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in features]
        starts = [int(f[f"{side}_response_start"]) for side in ("chosen", "rejected")
                  for f in features]
        longest = max(len(s) for s in seqs)
        t = -(-longest // self.multiple) * self.multiple
        input_ids = torch.full((len(seqs), t), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((len(seqs), t), dtype=torch.long)  # (2B, T)
        response_mask = torch.zeros((len(seqs), t), dtype=torch.long)  # (2B, T)
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            n = len(seq)
            input_ids[i, :n] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[i, :n] = 1
            response_mask[i, start:n] = 1
        rows = torch.tensor([int(f["row"]) for f in features], dtype=torch.long)  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "response_mask": response_mask, "row": rows}

"""Shared pieces of the LoRA merge (qorpo/merge.py): errors, dtype tables, tensor sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qorpo.merge_verify import VerifyReport

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

# safetensors header dtype names
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
PREFIX = "base_model.model."  # of every tensor key in a peft adapter file


class MergeError(RuntimeError):
    """The merge cannot proceed; the message says what is wrong and what to do."""


class MergeVerificationError(MergeError):
    """The merged model's logits disagree with base + adapter beyond tolerance."""

    def __init__(self, message: str, report: VerifyReport) -> None:
        super().__init__(message)
        self.report = report


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return ST_DTYPES[dtype].itemsize * numel(shape)

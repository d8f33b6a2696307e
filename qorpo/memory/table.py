"""The tables of docs/memory.md: the largest batch that fits common cards, per model and length
(CUDA estimates; scripts/memory_table.py regenerates them, tests/test_docs.py checks they agree)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, NamedTuple

from qorpo.config import DEFAULT_CHUNK_SIZE
from qorpo.memory.formula import (
    BYTES_FP32,
    CHUNK_BUFFERS,
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    GIB,
    USABLE_FRACTION,
    MemoryEstimate,
    estimate,
)
from qorpo.memory.shapes import MODELS, ModelShape

# A card sold as 16 GB shows 15,360 of 16,384 MiB on a Colab T4 (ECC on): count 94 % of the
# nominal size as usable. Cards that also drive a display have less.
CARD_SIZES_GB = (8, 12, 16, 24)
SEQ_LENS = (1024, 2048, 4096)
MAX_PAIRS = 16  # the table stops counting here: gradient accumulation is exact anyway


def usable_bytes(card_gb: float) -> float:
    return card_gb * GIB * USABLE_FRACTION


def max_pairs(model: ModelShape | str, seq_len: int, card_gb: float, *, cap: int = MAX_PAIRS,
              **kwargs: Any) -> int:
    """Largest pairs-per-micro-batch (up to `cap`) whose estimate fits the card; 0 if none."""
    best = 0
    for pairs in range(1, cap + 1):
        if estimate(model, seq_len, pairs=pairs, **kwargs).total > usable_bytes(card_gb):
            break
        best = pairs
    return best


# ----------------------------------------------------------------------------- the docs table


class TableRow(NamedTuple):
    model: str
    params_b: float
    seq_len: int
    total_gib: float  # 1 pair
    allocated_gib: float  # 1 pair, without the context/fragmentation allowance
    naive_logits_gib: float  # 1 pair, the full-logits loss's buffers alone
    chunked_logits_gib: float  # qorpo's chunk buffers
    max_pairs: dict[str, int]  # card size -> pairs per micro-batch that fit (0: none)


def table_rows() -> list[TableRow]:
    """One row per (model, seq_len) with the 1-pair estimate and max pairs per card size."""
    rows: list[TableRow] = []
    for name, shape in MODELS.items():
        for t in SEQ_LENS:
            est = estimate(shape, t)
            chunk = min(DEFAULT_CHUNK_SIZE, 2 * t) * shape.vocab * BYTES_FP32 * CHUNK_BUFFERS
            rows.append(TableRow(
                model=name, params_b=round(shape.params / 1e9, 2), seq_len=t,
                total_gib=round(est.total / GIB, 2), allocated_gib=round(est.allocated / GIB, 2),
                naive_logits_gib=round(est.naive_logits / GIB, 2),
                chunked_logits_gib=round(chunk / GIB, 2),
                max_pairs={f"{gb}GB": max_pairs(shape, t, gb) for gb in CARD_SIZES_GB},
            ))
    return rows


def _cell(pairs: int) -> str:
    if pairs == 0:
        return "✗"
    return f"{MAX_PAIRS}+" if pairs >= MAX_PAIRS else str(pairs)


def markdown_tables() -> str:
    """The tables of docs/memory.md (between its marker comments), exactly."""
    head = ["model", "params", "max length", "estimate, 1 pair (GiB)",
            *[f"{gb} GB" for gb in CARD_SIZES_GB], "naive logits alone (GiB)"]
    lines = ["Estimates (formula in qorpo/memory/formula.py), not measurements.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows():
        cells = [r.model, f"{r.params_b:.2f} B", f"{r.seq_len:,}", f"{r.total_gib:.1f}",
                 *[_cell(r.max_pairs[f"{gb}GB"]) for gb in CARD_SIZES_GB],
                 f"{r.naive_logits_gib:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Breakdown at 2,048 tokens, 1 pair (GiB):", ""]
    parts = [f for f in MemoryEstimate._fields[:-1] if f != "attention_mask"]  # 0 here
    lines.append("| model | " + " | ".join(p.replace("_", " ") for p in parts) + " | total |")
    lines.append("|" + "---|" * (len(parts) + 2))
    for name, shape in MODELS.items():
        g = estimate(shape, 2048).gib()
        lines.append(f"| {name} | " + " | ".join(f"{g[p]:.2f}" for p in parts)
                     + f" | {g['total']:.2f} |")
    return "\n".join(lines) + "\n"


def json_summary() -> str:
    """One JSON line: the constants and every table row (for scripts and CI logs)."""
    return json.dumps({
        "source": "estimate (formula in qorpo/memory/formula.py)", "measured_on_gpu": False,
        "assumptions": {"lora_r": 16, "chunk_size": DEFAULT_CHUNK_SIZE,
                        "optim": "paged_adamw_8bit", "weights": "NF4 double quant",
                        "cuda_context_gib": CUDA_CONTEXT_BYTES / GIB,
                        "fragmentation": FRAGMENTATION, "usable_fraction": USABLE_FRACTION},
        "models": {k: asdict(v) for k, v in MODELS.items()},
        "rows": [r._asdict() for r in table_rows()],
    })

"""What attention costs in a laid-out row: how long packed rows may grow, and when the per-pair
kernel is worth its Python loop. Plain Python (the collator and the memory plan use it)."""

from __future__ import annotations

from qorpo.attention import FLEX, PAIR_ATTENTION

# Rows shorter than this take the one masked kernel: the wasted blocks of a short row cost less
# than a Python loop of per-pair calls (2-layer test model, 96-token rows: the loop was ~4 ms
# of a 36 ms step; at 256 tokens masked and causal kernels cost about the same per block).
MIN_ROW_LENGTH = 256

# The width assumed when a model's is unknown: SmolLM2-135M's.
DEFAULT_HIDDEN = 576


def cost_per_key(hidden: int | None) -> float:
    """How much one position of a row costs, relative to its linear layers, per position of the
    row it attends over: attention is ~4·H FLOPs per (query, key) per layer, the linear layers
    ~2·P per token (P = parameters per layer, ~12·H² for a Llama block), so 4H / 2P ≈ 1 / (6 H).
    A custom mask stops kernels from skipping masked blocks, so a row of length L costs about
    L · (1 + L · cost) — what qorpo.data.placement.choose_capacity minimises. A bigger model's is
    smaller (longer rows pay off more). `hidden` None: DEFAULT_HIDDEN."""
    return 1 / (6 * int(hidden or DEFAULT_HIDDEN))


DEFAULT_ATTENTION_COST = cost_per_key(None)


def skips_masked_blocks(implementation: str | None) -> bool:
    """Whether this attention implementation skips the blocks a layout's mask rules out
    (pairs sharing a packed row then cost no attention for each other)."""
    return implementation in (PAIR_ATTENTION, FLEX)

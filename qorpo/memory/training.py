"""The memory of a `qorpo train` run: its TrainConfig and prepared data in, the plan out
(qorpo.memory.plan), and the pairs checked against the model's context."""

from __future__ import annotations

from typing import Any

from qorpo.config import TrainConfig
from qorpo.errors import ConfigError
from qorpo.memory.plan import (
    RunEstimate,
    detect_capacity,
    gpu_capacity,
    pair_lengths,
    plan,
)
from qorpo.memory.shapes import model_shape
from qorpo.sysmem import allocator


def context_notes(cfg: TrainConfig, data: Any) -> list[str]:
    """Pairs longer than the model's context (max_position_embeddings) are refused: positions
    past it are untrained, or out of range. A --max-length above it that no pair reaches only
    gets a note (positions are pair-relative in every layout, so a pair is what must fit)."""
    context = model_shape(cfg.model, cfg.revision, cfg.trust_remote_code).context
    if context is None or cfg.max_length <= context:
        return []
    pairs = [*pair_lengths(data.train), *(pair_lengths(data.eval) if data.eval else [])]
    longest = max((p + max(c, r) for p, c, r in pairs), default=0)
    if longest > context:
        raise ConfigError([f"max_length: pairs of up to {longest:,} tokens are longer than "
                           f"{cfg.model}'s context of {context:,} (max_position_embeddings); "
                           f"use --max-length {context} or less"])
    return [f"--max-length {cfg.max_length:,} is above the model's context of {context:,}; "
            f"no pair here is longer than {longest:,} tokens, so none goes past it"]


def train_estimate(cfg: TrainConfig, data: Any, device: str,
                   runs_as: tuple[str, str | None] | None = None,
                   runtime: tuple[float, float] | None = None) -> RunEstimate:
    """This run's memory estimate (qorpo.memory.plan): the model's config.json, the data's
    real token lengths, the layout; on a `--gpu-memory` card if given, else on this device.
    `runs_as`: the (layout, kernel) the loaded model really runs, where it fell back from the
    planned ones (qorpo.attention.plan.planned). `runtime`: this CPU process's (resident,
    peak) bytes before the model loads (qorpo.sysmem.runtime_resident)."""
    from qorpo.attention.plan import planned  # imports torch: only where a run needs it

    if cfg.gpu_memory is not None:
        device, capacity = "cuda", gpu_capacity(cfg.gpu_memory)
    else:
        capacity = detect_capacity(device)
    layout, kernel = runs_as or (cfg.layout, planned(device, cfg.layout, cfg.attn_implementation))
    return plan(model_shape(cfg.model, cfg.revision, cfg.trust_remote_code),
                pair_lengths(data.train), device=device, batch_size=cfg.batch_size,
                layout=layout, max_length=cfg.max_length,
                max_prompt_length=cfg.resolved_max_prompt_length, lora_r=cfg.lora_r,
                chunk_size=cfg.chunk_size, checkpointing=cfg.gradient_checkpointing,
                low_cpu_memory=cfg.low_cpu_memory, sft_on_prompt=cfg.sft_on_prompt,
                lora_dropout=cfg.lora_dropout > 0, capacity=capacity,
                kernel=kernel, allocator=allocator(),
                runtime=runtime if device == "cpu" else None)

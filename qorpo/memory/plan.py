"""Will it fit? The estimate for one run — its data's real lengths, its layout, its device — the
headroom on the device, and which knob to turn first when it does not fit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from qorpo.config import parse_memory_size
from qorpo.errors import ConfigError
from qorpo.memory.formula import GIB, USABLE_FRACTION, MemoryEstimate, Workload, estimate
from qorpo.memory.shapes import ModelShape

Lengths = tuple[int, int, int]  # one pair's (prompt, chosen response, rejected response) tokens
ROUND_TO = 8  # the collator pads rows to a multiple of 8
# glibc's default allocator on a run WITHOUT gradient checkpointing: peak RSS up to this many
# times the live estimate. Measured, SmolLM2-135M 4-bit, packed: 4 pairs x 512, two steps of
# one shape: 9.8 GiB against an estimate of 7.8 (1.26x; 6.6 pinned); the offline demo (12
# steps of 2 x 4 pairs of up to 102 tokens, rows of changing shapes): 2.89, 2.93, 2.99, 3.00,
# 3.09 and 3.13 GiB against an estimate of 1.90 (1.52-1.65x). No model behind it (micro-batches
# of changing shapes leave glibc holes it does not reuse), so kept above all of them.
NO_CHECKPOINT_BOUND = 1.75


class Capacity(NamedTuple):
    device: str  # cuda | cpu
    bytes: float
    source: str  # where the number comes from


class Knob(NamedTuple):
    change: str  # e.g. "--batch-size 1"
    total: float  # bytes of the estimate with that change
    fits: bool


class RunEstimate(NamedTuple):
    device: str
    peak: MemoryEstimate  # the micro-batch of the longest pairs
    typical: MemoryEstimate  # a micro-batch of median pairs
    capacity: Capacity | None
    knobs: tuple[Knob, ...]  # what to change when it does not fit, best first
    note: str = ""  # what the estimate cannot promise (CPU with glibc's default allocator)
    # CPU: whether glibc's thresholds are pinned (--low-cpu-memory, asked for or chosen
    # because `default_bound` would not fit), and the peak RSS glibc's default allocator may
    # reach (see allocator_bound); None on CUDA.
    low_cpu_memory: bool = False
    default_bound: float | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak.total <= self.capacity.bytes

    @property
    def headroom(self) -> float | None:
        return None if self.capacity is None else self.capacity.bytes - self.peak.total

    def to_json(self) -> dict[str, Any]:
        cap = self.capacity
        return {
            "device": self.device, "total_gb": round(self.peak.total / GIB, 3),
            "typical_gb": round(self.typical.total / GIB, 3),
            "components_gb": self.peak.gib(),
            "capacity_gb": None if cap is None else round(cap.bytes / GIB, 3),
            "capacity_source": None if cap is None else cap.source,
            "fits": self.fits,
            "headroom_gb": None if self.headroom is None else round(self.headroom / GIB, 3),
            "knobs": [{"change": k.change, "total_gb": round(k.total / GIB, 3), "fits": k.fits}
                      for k in self.knobs],
            "note": self.note,
            "low_cpu_memory": self.low_cpu_memory,
            "default_allocator_bound_gb": (None if self.default_bound is None
                                           else round(self.default_bound / GIB, 3)),
        }


# ----------------------------------------------------------------------------- workloads
def _round(n: int) -> int:
    return -(-n // ROUND_TO) * ROUND_TO


def workload(pairs: Sequence[Lengths], layout: str, *, sft_on_prompt: bool = False,
             hidden: int | None = None, kernel: str | None = None) -> Workload:
    """The micro-batch these pairs make in `layout` (rows x length as qorpo.data.collate
    builds them, packed rows as long as its choose_capacity makes them for a model of width
    `hidden`). `kernel`: qorpo.kernels.planned — a kernel that skips masked blocks lets pairs
    share a row for free; FlexAttention needs no dense (R, 1, L, L) mask, every other kernel
    gets one unless nothing is padded."""
    from qorpo.attention import NAME as PAIR_ATTENTION
    from qorpo.data.collate import DEFAULT_ATTENTION_COST, choose_capacity, pack_rows
    from qorpo.kernels import FLEX, skips_masked_blocks

    scored = sum(c + r + (p - 1 if sft_on_prompt else 0) for p, c, r in pairs)
    sparse = layout != "padded" and skips_masked_blocks(kernel)
    if layout == "padded":
        used = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        rows, length = len(used), _round(max(used))
    else:
        shared = [p + c + r for p, c, r in pairs]
        if layout == "shared":
            rows, length = len(shared), _round(max(shared))
        else:
            cost = 0.0 if sparse else (1 / (6 * hidden) if hidden else DEFAULT_ATTENTION_COST)
            packed = pack_rows(shared, choose_capacity(shared, ROUND_TO, cost))
            rows, length = len(packed), _round(max(sum(shared[i] for i in r) for r in packed))
    padded = layout == "padded" and rows * length == sum(used)
    flex = sparse and kernel == FLEX
    return Workload(rows, length, scored, mask=not padded and not flex,
                    pair_attention=sparse and kernel == PAIR_ATTENTION)


def batches(lengths: Sequence[Lengths], batch_size: int) -> tuple[list[Lengths], list[Lengths]]:
    """(the micro-batch of the longest pairs, a micro-batch of median pairs)."""
    if not lengths:
        raise ValueError("no pairs")
    by_size = sorted(lengths, key=lambda t: (t[0] + t[1] + t[2], t))
    peak = by_size[-batch_size:]
    median = tuple(sorted(x[k] for x in lengths)[len(lengths) // 2] for k in range(3))
    return peak, [median] * min(batch_size, len(lengths))  # type: ignore[list-item]


def assumed_lengths(max_length: int, max_prompt_length: int | None = None) -> list[Lengths]:
    """Without data: a pair that fills max_length on both sides (the worst case)."""
    prompt = max_prompt_length or max_length // 2
    return [(prompt, max_length - prompt, max_length - prompt)]


def clip(lengths: Sequence[Lengths], max_length: int, max_prompt: int) -> list[Lengths]:
    """The lengths qorpo's length policy would leave at another max_length."""
    out = []
    for p, c, r in lengths:
        p = min(p, max_prompt)
        room = max_length - p
        out.append((p, min(c, room), min(r, room)))
    return out


# ----------------------------------------------------------------------------- capacity
def gpu_capacity(size: str) -> Capacity:
    """A GPU the user names (`--gpu-memory 16GB`), at the share of it a run can plan with.
    Raises ValueError for a size that cannot be read."""
    return Capacity("cuda", parse_memory_size(size) * USABLE_FRACTION,
                    f"--gpu-memory {size} ({USABLE_FRACTION:.0%} usable)")


def detect_capacity(device: str) -> Capacity | None:
    """The device's memory: the GPU's total (94% of it usable), or the CPU's available RAM."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return Capacity("cuda", props.total_memory * USABLE_FRACTION,
                        f"{props.name} ({USABLE_FRACTION:.0%} of its memory)")
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    except (OSError, ValueError):
        return None
    if "MemAvailable" not in info:
        return None
    # processes of one launch on this machine (torchrun, accelerate) share its RAM
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = "" if local == 1 else f" / {local} processes"
    return Capacity("cpu", info["MemAvailable"] / local, f"available RAM (/proc/meminfo){share}")


# ----------------------------------------------------------------------------- the plan
def plan(shape: ModelShape, lengths: Sequence[Lengths], *, device: str, batch_size: int,
         layout: str, max_length: int, max_prompt_length: int, lora_r: int = 16,
         chunk_size: int = 256, checkpointing: bool = True, low_cpu_memory: bool | None = None,
         sft_on_prompt: bool = False, lora_dropout: bool = True,
         capacity: Capacity | None = None, kernel: str | None = None,
         allocator: str = "glibc") -> RunEstimate:
    """The run's estimate on `device`, and — when `capacity` is known and it does not fit —
    what each knob would give, cheapest first. On the CPU also whether glibc's thresholds are
    pinned: `low_cpu_memory` as asked, or (None) when the default allocator's bound would not
    fit `capacity`. `allocator`: qorpo.sysmem.allocator() of the process that will train
    (jemalloc/tcmalloc return freed memory themselves: no bound, nothing to pin)."""

    def est(lens: Sequence[Lengths], **over: Any) -> MemoryEstimate:
        kw = dict(lora_r=lora_r, chunk_size=chunk_size, device=device, lora_dropout=lora_dropout,
                  checkpointing=checkpointing)
        kw |= {k: v for k, v in over.items() if k != "batch_size" and k != "layout"}
        peak_pairs, _ = batches(lens, over.get("batch_size", batch_size))
        work = workload(peak_pairs, over.get("layout", layout), sft_on_prompt=sft_on_prompt,
                        hidden=shape.hidden, kernel=kernel)
        return estimate(shape, workload=work, **kw)

    peak = est(lengths)
    _, median = batches(lengths, batch_size)
    typical = estimate(shape, workload=workload(median, layout, sft_on_prompt=sft_on_prompt,
                                                hidden=shape.hidden,
                                                kernel=kernel),
                       lora_r=lora_r, chunk_size=chunk_size, device=device,
                       lora_dropout=lora_dropout, checkpointing=checkpointing)
    knobs: list[Knob] = []
    if capacity is not None and peak.total > capacity.bytes:
        tries: list[tuple[str, MemoryEstimate]] = []
        if batch_size > 1:
            tries.append(("--batch-size 1 (raise --grad-accum: the same gradient)",
                          est(lengths, batch_size=1)))
        if not checkpointing:
            tries.append(("--gradient-checkpointing", est(lengths, checkpointing=True)))
        if layout != "packed":
            tries.append(("--prefix-sharing --packing", est(lengths, layout="packed")))
        if chunk_size > 64:
            tries.append(("--chunk-size 64", est(lengths, chunk_size=64)))
        half = max_length // 2
        if half >= 64:
            shorter = clip(lengths, half, min(max_prompt_length, half // 2))
            tries.append((f"--max-length {half}", est(shorter)))
        knobs = [Knob(what, e.total, e.total <= capacity.bytes) for what, e in tries]
        knobs.sort(key=lambda k: (not k.fits, k.total))
    if device != "cpu" or allocator != "glibc":
        return RunEstimate(device, peak, typical, capacity, tuple(knobs))
    bound = allocator_bound(shape, peak, est(lengths, checkpointing=False), checkpointing)
    room = None if capacity is None else capacity.bytes
    pinned = bool(low_cpu_memory) if low_cpu_memory is not None else (
        room is not None and bound > room)
    gib = f"{bound / GIB:.1f} GiB"
    if pinned and low_cpu_memory is None:
        note = (f"glibc's default allocator could hold up to {gib} (freed memory kept "
                f"resident), more than the {room / GIB:.1f} GiB available: its thresholds are "
                "pinned (--low-cpu-memory), so the peak is this estimate; 1.4-1.6x slower "
                "(--no-low-cpu-memory to keep the default allocator)")
    elif pinned:
        note = ""  # asked for: the estimate is the peak
    else:
        note = (f"glibc's default allocator (fast) keeps freed memory resident: peak RSS "
                f"between this estimate and {gib}; with --low-cpu-memory it is this estimate, "
                "1.4-1.6x slower (chosen automatically when the bound does not fit)")
    return RunEstimate(device, peak, typical, capacity, tuple(knobs), note, pinned, bound)


def allocator_bound(shape: ModelShape, live: MemoryEstimate, unchecked: MemoryEstimate,
                    checkpointing: bool) -> float:
    """The peak RSS glibc's default allocator may reach for a step whose live peak is `live`
    (`unchecked`: the same step without gradient checkpointing).

    With its dynamic mmap threshold, glibc serves activations from its heap and rarely reuses
    or returns what torch frees inside a step (a 4 x 512 packed step: the heap grew to 5.3 GiB
    while malloc counted 0.5 GiB in use). Measured (scripts/bench_memory.py --malloc default,
    scripts/bench_speed.py), a checkpointed step's peak then climbs towards what it would hold
    live without checkpointing: as if each layer's recomputed activations, freed after its
    backward, were never reused — kept on top of the checkpoints (docs/memory.md lists the
    runs; none went above).
    A step without checkpointing: NO_CHECKPOINT_BOUND. Loading a 16-bit checkpoint leaves
    the same kind of heap behind: each linear weight is converted to fp32 to be quantised and
    freed (a 360M-shape bf16 model: 2.64 GiB loaded with the default allocator, 1.53 pinned;
    its linear weights in fp32 are 1.17 GiB), and the step does not reuse it."""
    loaded = 4.0 * shape.linear_params if shape.checkpoint_bytes < 4 else 0.0
    if checkpointing:  # every layer's recomputed set kept, on top of the checkpoints
        return max(live.total, unchecked.total + live.checkpoints) + loaded
    return live.total * NO_CHECKPOINT_BOUND + loaded


def largest_fits(shape: ModelShape, capacity: Capacity, *, layout: str = "packed",
                 kernel: str | None = None, max_length: int = 1024,
                 **kwargs: Any) -> dict[str, int]:
    """Without data: the longest max_length (batch 1; never past the model's context) and the
    largest batch at `max_length` tokens whose worst-case estimate fits (on the CPU: with the
    thresholds pinned where needed)."""

    def fits(length: int, batch: int) -> bool:
        lens = assumed_lengths(length) * batch
        work = workload(lens, layout, hidden=shape.hidden, kernel=kernel)
        return estimate(shape, workload=work, device=capacity.device,
                        **kwargs).total <= capacity.bytes

    length = 0
    steps = {256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072}
    if shape.context is not None:  # the model's own context is a candidate too (e.g. 40,960)
        steps = {n for n in steps if n < shape.context} | {shape.context}
    for n in sorted(steps):
        if not fits(n, 1):
            break
        length = n
    batch = 0
    for b in range(1, 65):
        if not fits(max_length, b):
            break
        batch = b
    return {"max_length_at_batch_1": length, "batch_at_max_length": batch,
            "max_length": max_length}


def check_context(max_length: int, shape: ModelShape) -> None:
    """ConfigError when --max-length is longer than the model takes (its context, from
    config.json): positions past it are untrained (or out of range) on every model."""
    if shape.context is not None and max_length > shape.context:
        raise ConfigError([f"max_length: {max_length:,} tokens is longer than {shape.name}'s "
                           f"context of {shape.context:,} (max_position_embeddings in its "
                           f"config.json); use --max-length {shape.context} or less"])


# ----------------------------------------------------------------------------- a training run
def pair_lengths(examples: Any) -> list[Lengths]:
    """(prompt, chosen, rejected) token counts of qorpo.data examples, as trained."""
    out = []
    for start, chosen, rejected in zip(examples["chosen_response_start"],
                                       examples["chosen_input_ids"],
                                       examples["rejected_input_ids"], strict=True):
        out.append((int(start), len(chosen) - int(start), len(rejected) - int(start)))
    return out


def model_shape(model: str, revision: str | None = None,
                trust_remote_code: bool = False) -> ModelShape:
    """The model's shape from its config.json alone: no weight file is opened."""
    from transformers import AutoConfig

    from qorpo.memory.shapes import shape_from_config

    cfg = AutoConfig.from_pretrained(model, revision=revision,
                                     trust_remote_code=trust_remote_code)
    return shape_from_config(cfg, name=str(model))


def peak_measured(device: str) -> float | None:
    """This process's peak so far: CUDA max_memory_allocated, or the CPU's peak RSS (VmHWM)."""
    if device == "cuda":
        import torch

        return float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return None

"""Will it fit? The estimate for one run — its data's real lengths, its layout, its device — the
headroom on the device, and which knob to turn first when it does not fit."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from qorpo.config import DEFAULT_CHUNK_SIZE, default_max_prompt_length, parse_memory_size
from qorpo.data.placement import PAD_MULTIPLE, Lengths, place
from qorpo.errors import ConfigError
from qorpo.memory.formula import GIB, USABLE_FRACTION, MemoryEstimate, Workload, estimate
from qorpo.memory.options import DEFAULT_MAX_LENGTH, EstimateConfig
from qorpo.memory.shapes import ModelShape, read_shape

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
def workload(pairs: Sequence[Lengths], layout: str, *, sft_on_prompt: bool = False,
             hidden: int | None = None, kernel: str | None = None) -> Workload:
    """The micro-batch these pairs make in `layout`: rows x length and scored tokens as
    qorpo.data.collate builds them (both ask qorpo.data.placement.place), packed rows as long
    as choose_capacity makes them for a model of width `hidden`. `kernel`:
    qorpo.attention.plan.planned — a kernel that skips masked blocks lets pairs share a row
    for free; FlexAttention needs no dense (R, 1, L, L) mask, every other kernel gets one
    unless nothing is padded."""
    from qorpo.attention import FLEX, PAIR_ATTENTION
    from qorpo.attention.cost import cost_per_key, skips_masked_blocks

    sparse = layout != "padded" and skips_masked_blocks(kernel)
    where = place(pairs, layout, sft_on_prompt=sft_on_prompt, pad_to_multiple_of=PAD_MULTIPLE,
                  attention_cost=0.0 if sparse else cost_per_key(hidden))
    full = layout == "padded" and where.pad_tokens == 0  # the model's own causal mask
    flex = sparse and kernel == FLEX
    return Workload(where.rows, where.length, where.scored_tokens, mask=not full and not flex,
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
    prompt = max_prompt_length or default_max_prompt_length(max_length)
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
         chunk_size: int = DEFAULT_CHUNK_SIZE, checkpointing: bool = True,
         low_cpu_memory: bool | None = None, sft_on_prompt: bool = False, lora_dropout: bool = True,
         capacity: Capacity | None = None, kernel: str | None = None,
         allocator: str = "glibc", runtime: tuple[float, float] | None = None) -> RunEstimate:
    """The run's estimate on `device`, and — when `capacity` is known and it does not fit —
    what each knob would give, cheapest first. On the CPU also whether glibc's thresholds are
    pinned: `low_cpu_memory` as asked, or (None) when the default allocator's bound would not
    fit `capacity`. `allocator`: qorpo.sysmem.allocator() of the process that will train
    (jemalloc/tcmalloc return freed memory themselves: no bound, nothing to pin). `runtime`:
    the CPU process's (resident, peak) bytes before the model loads (memory.formula.estimate)."""

    def est(lens: Sequence[Lengths], **over: Any) -> MemoryEstimate:
        """The estimate for the peak micro-batch of `lens`, with some settings changed."""
        kw = dict(lora_r=lora_r, chunk_size=chunk_size, device=device, lora_dropout=lora_dropout,
                  checkpointing=checkpointing, runtime=runtime)
        kw |= {k: v for k, v in over.items() if k != "batch_size" and k != "layout"}
        peak_pairs, _ = batches(lens, over.get("batch_size", batch_size))
        work = workload(peak_pairs, over.get("layout", layout), sft_on_prompt=sft_on_prompt,
                        hidden=shape.hidden, kernel=kernel)
        return estimate(shape, workload=work, **kw)

    peak = est(lengths)
    _, median = batches(lengths, batch_size)
    typical = est(median, batch_size=len(median))  # every pair of it: the median batch
    knobs: tuple[Knob, ...] = ()
    if capacity is not None and peak.total > capacity.bytes:
        tries = _knob_tries(est, lengths, batch_size=batch_size, checkpointing=checkpointing,
                            layout=layout, chunk_size=chunk_size, max_length=max_length,
                            max_prompt_length=max_prompt_length)
        knobs = tuple(sorted((Knob(what, e.total, e.total <= capacity.bytes)
                              for what, e in tries), key=lambda k: (not k.fits, k.total)))
    if device != "cpu" or allocator != "glibc":
        return RunEstimate(device, peak, typical, capacity, knobs)
    bound = allocator_bound(shape, peak, est(lengths, checkpointing=False), checkpointing)
    room = None if capacity is None else capacity.bytes
    pinned = bool(low_cpu_memory) if low_cpu_memory is not None else (
        room is not None and bound > room)
    note = _allocator_note(bound, room, pinned, asked=low_cpu_memory is not None)
    return RunEstimate(device, peak, typical, capacity, knobs, note, pinned, bound)


def _knob_tries(est: Callable[..., MemoryEstimate], lengths: Sequence[Lengths], *,
                batch_size: int, checkpointing: bool, layout: str, chunk_size: int,
                max_length: int, max_prompt_length: int) -> list[tuple[str, MemoryEstimate]]:
    """Each knob a run could turn, with the estimate it would give (`est`: plan's)."""
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
        shorter = clip(lengths, half, min(max_prompt_length, default_max_prompt_length(half)))
        tries.append((f"--max-length {half}", est(shorter)))
    return tries


def _allocator_note(bound: float, room: float | None, pinned: bool, *, asked: bool) -> str:
    """What the CPU estimate cannot promise with glibc's allocator (`asked`: --low-cpu-memory
    or --no-low-cpu-memory given, rather than left to qorpo)."""
    gib = f"{bound / GIB:.1f} GiB"
    if pinned and not asked:
        return (f"glibc's default allocator could hold up to {gib} (freed memory kept "
                f"resident), more than the {room / GIB:.1f} GiB available: its thresholds are "
                "pinned (--low-cpu-memory), so the peak is this estimate; 1.4-1.6x slower "
                "(--no-low-cpu-memory to keep the default allocator)")
    if pinned:
        return ""  # asked for: the estimate is the peak
    return (f"glibc's default allocator (fast) keeps freed memory resident: peak RSS "
            f"between this estimate and {gib}; with --low-cpu-memory it is this estimate, "
            "1.4-1.6x slower (chosen automatically when the bound does not fit)")


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


# ----------------------------------------------------------------------------- qorpo estimate
class EstimateReport(NamedTuple):
    """What `qorpo estimate` says: the plan for worst-case pairs, and what would fit."""

    model: str
    max_length: int  # as asked, or the default for this model
    batch_size: int
    context: int | None  # the model's (config.json), None when it does not say
    estimate: RunEstimate
    largest: dict[str, int]  # largest_fits; {} when the device's memory is unknown

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, **self.estimate.to_json(), "largest": self.largest}


def estimate_run(config: EstimateConfig) -> EstimateReport:
    """`qorpo estimate` as a function: the memory a run of `config` needs, from the model's
    config.json alone (no data yet: pairs that fill max_length on both sides)."""
    from qorpo.attention.plan import planned
    from qorpo.sysmem import allocator

    cfg = config.validate()
    device = cfg.device or ("cuda" if cfg.gpu_memory else None)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    capacity = gpu_capacity(cfg.gpu_memory) if cfg.gpu_memory else detect_capacity(device)
    shape = read_shape(str(cfg.model))
    length = cfg.max_length or min(DEFAULT_MAX_LENGTH, shape.context or DEFAULT_MAX_LENGTH)
    check_context(length, shape)
    kernel = planned(device, cfg.layout, None)
    est = plan(shape, assumed_lengths(length) * cfg.batch_size, device=device,
               batch_size=cfg.batch_size, layout=cfg.layout, max_length=length,
               max_prompt_length=default_max_prompt_length(length), lora_r=cfg.lora_r,
               capacity=capacity, low_cpu_memory=cfg.low_cpu_memory, allocator=allocator(),
               kernel=kernel)
    best = largest_fits(shape, capacity, layout=cfg.layout, lora_r=cfg.lora_r,
                        max_length=length, kernel=kernel) if capacity else {}
    return EstimateReport(str(cfg.model), length, cfg.batch_size, shape.context, est, best)


# ----------------------------------------------------------------------------- a training run
def pair_lengths(examples: Any) -> list[Lengths]:
    """(prompt, chosen, rejected) token counts of qorpo.data examples, as trained."""
    out = []
    for start, chosen, rejected in zip(examples["chosen_response_start"],
                                       examples["chosen_input_ids"],
                                       examples["rejected_input_ids"], strict=True):
        out.append((int(start), len(chosen) - int(start), len(rejected) - int(start)))
    return out


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

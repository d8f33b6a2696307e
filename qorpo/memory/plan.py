"""Will it fit? The estimate for one run — its data's real lengths, its layout, its device — the
headroom on the device, and which knob to turn first when it does not fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from qorpo.config import parse_memory_size
from qorpo.memory.formula import GIB, USABLE_FRACTION, MemoryEstimate, Workload, estimate
from qorpo.memory.shapes import ModelShape

Lengths = tuple[int, int, int]  # one pair's (prompt, chosen response, rejected response) tokens
ROUND_TO = 8  # the collator pads rows to a multiple of 8


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
        }


# ----------------------------------------------------------------------------- workloads
def _round(n: int) -> int:
    return -(-n // ROUND_TO) * ROUND_TO


def workload(pairs: Sequence[Lengths], layout: str, *, sft_on_prompt: bool = False,
             hidden: int | None = None, pair_attention: bool = False) -> Workload:
    """The micro-batch these pairs make in `layout` (rows x length as qorpo.data.collate
    builds them, packed rows as long as its choose_capacity makes them for a model of width
    `hidden`, or with qorpo.attention's per-pair kernels; the mask is a 4-D (R, 1, L, L)
    boolean tensor unless nothing is padded)."""
    from qorpo.data.collate import DEFAULT_ATTENTION_COST, choose_capacity, pack_rows

    scored = sum(c + r + (p - 1 if sft_on_prompt else 0) for p, c, r in pairs)
    if layout == "padded":
        used = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        rows, length = len(used), _round(max(used))
    else:
        shared = [p + c + r for p, c, r in pairs]
        if layout == "shared":
            rows, length = len(shared), _round(max(shared))
        else:
            cost = 0.0 if pair_attention else (1 / (6 * hidden) if hidden
                                                else DEFAULT_ATTENTION_COST)
            packed = pack_rows(shared, choose_capacity(shared, ROUND_TO, cost))
            rows, length = len(packed), _round(max(sum(shared[i] for i in r) for r in packed))
    padded = layout == "padded" and rows * length == sum(used)
    return Workload(rows, length, scored, mask=not padded,
                    pair_attention=pair_attention and layout != "padded")


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
        return Capacity("cpu", float(info["MemAvailable"]), "available RAM (/proc/meminfo)")
    except (OSError, KeyError, ValueError):
        return None


# ----------------------------------------------------------------------------- the plan
def plan(shape: ModelShape, lengths: Sequence[Lengths], *, device: str, batch_size: int,
         layout: str, max_length: int, max_prompt_length: int, lora_r: int = 16,
         chunk_size: int = 256, checkpointing: bool = True, low_cpu_memory: bool = False,
         sft_on_prompt: bool = False, lora_dropout: bool = True,
         capacity: Capacity | None = None, pair_attention: bool = False) -> RunEstimate:
    """The run's estimate on `device`, and — when `capacity` is known and it does not fit —
    what each knob would give, cheapest first."""

    def est(lens: Sequence[Lengths], **over: Any) -> MemoryEstimate:
        kw = dict(lora_r=lora_r, chunk_size=chunk_size, device=device, lora_dropout=lora_dropout,
                  checkpointing=checkpointing, low_cpu_memory=low_cpu_memory)
        kw |= {k: v for k, v in over.items() if k != "batch_size" and k != "layout"}
        peak_pairs, _ = batches(lens, over.get("batch_size", batch_size))
        work = workload(peak_pairs, over.get("layout", layout), sft_on_prompt=sft_on_prompt,
                        hidden=shape.hidden, pair_attention=pair_attention)
        return estimate(shape, workload=work, **kw)

    peak = est(lengths)
    _, median = batches(lengths, batch_size)
    typical = estimate(shape, workload=workload(median, layout, sft_on_prompt=sft_on_prompt,
                                                hidden=shape.hidden,
                                                pair_attention=pair_attention),
                       lora_r=lora_r, chunk_size=chunk_size, device=device,
                       lora_dropout=lora_dropout, checkpointing=checkpointing,
                       low_cpu_memory=low_cpu_memory)
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
        if device == "cpu" and not low_cpu_memory:
            tries.append(("--low-cpu-memory", est(lengths, low_cpu_memory=True)))
        if chunk_size > 64:
            tries.append(("--chunk-size 64", est(lengths, chunk_size=64)))
        half = max_length // 2
        if half >= 64:
            shorter = clip(lengths, half, min(max_prompt_length, half // 2))
            tries.append((f"--max-length {half}", est(shorter)))
        knobs = [Knob(what, e.total, e.total <= capacity.bytes) for what, e in tries]
        knobs.sort(key=lambda k: (not k.fits, k.total))
    note = ""
    if device == "cpu" and not low_cpu_memory:
        note = ("glibc's default allocator keeps freed memory: the measured peak RSS varies from "
                "run to run and was 1.8-6.2x the live memory; with --low-cpu-memory the peak "
                "is this estimate (within 6% in scripts/bench_memory.py)")
    return RunEstimate(device, peak, typical, capacity, tuple(knobs), note)


def largest_fits(shape: ModelShape, capacity: Capacity, *, layout: str = "packed",
                 **kwargs: Any) -> dict[str, int]:
    """Without data: the longest max_length (batch 1) and the largest batch (at 1,024 tokens)
    whose worst-case estimate fits."""

    def fits(max_length: int, batch: int) -> bool:
        lens = assumed_lengths(max_length) * batch
        work = workload(lens, layout, hidden=shape.hidden)
        return estimate(shape, workload=work, device=capacity.device,
                        **kwargs).total <= capacity.bytes

    length = 0
    for n in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
        if fits(n, 1):
            length = n
    batch = 0
    for b in range(1, 65):
        if not fits(1024, b):
            break
        batch = b
    return {"max_length_at_batch_1": length, "batch_at_1024": batch}


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

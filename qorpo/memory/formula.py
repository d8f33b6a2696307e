"""Peak memory of a qorpo training step, component by component: a formula with its reasons.

Two devices, two meanings of "memory":

* ``cuda``: what torch.cuda.max_memory_allocated reaches, plus an allowance for the CUDA context
  and the caching allocator. 16-bit compute, paged 8-bit AdamW.
* ``cpu``: the process's peak RSS (what `top` and the OOM killer see) with glibc's thresholds
  pinned (qorpo.sysmem): fp32 compute, torch's AdamW, plus what the Python runtime and its
  libraries hold (calibrated with scripts/bench_memory.py; see docs/memory.md). glibc's
  *default* allocator keeps freed memory resident on top of that; qorpo.memory.plan bounds it.

The step's tokens come from a `Workload`: rows x row length of the batch layout (padded,
prefix-shared or packed; see qorpo.data.collate) and the scored tokens. Assumptions otherwise
are qorpo's defaults: NF4 double-quant base, LoRA on every linear layer, non-reentrant gradient
checkpointing, SDPA attention, the chunked loss.
"""

from __future__ import annotations

from typing import NamedTuple

from qorpo.config import DEFAULT_CHUNK_SIZE
from qorpo.memory.shapes import MODELS, ModelShape

GIB = 2**30

# NF4 with double quantisation (bitsandbytes, blocksize 64): 4-bit codes, one 8-bit absmax per
# 64 weights, one fp32 absmax per 256 of those (the QLoRA paper's 0.127 bits/param overhead).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
BYTES_16BIT = 2
BYTES_FP32 = 4
# LoRA weights and their gradients are fp32 (peft's autocast_adapter_dtype under 16-bit).
LORA_PARAM_BYTES = BYTES_FP32
LORA_GRAD_BYTES = BYTES_FP32
# AdamW state per trainable parameter: two moments. bitsandbytes' 8-bit optimizers store each in
# one byte plus an fp32 absmax per 256-value block; torch's AdamW stores two fp32 values.
OPTIMIZER_STATE_BYTES = {
    "paged_adamw_8bit": 2 * (1 + 4 / 256),
    "adamw_8bit": 2 * (1 + 4 / 256),
    "adamw_torch": 2 * BYTES_FP32,
}
# The chunked loss keeps about three (chunk, vocab) buffers alive at once: fp32 logits, the
# fp32 log-softmax that becomes the probabilities in place, and the copy of the probabilities
# for the hidden-state gradient matmul (rounded up to a third fp32 buffer).
CHUNK_BUFFERS = 3
# The naive path (TRL-style: full logits -> log_softmax -> gather) holds the logits in 16 bits,
# their fp32 upcast and the fp32 log-softmax: 2 + 4 + 4 bytes per logit.
NAIVE_LOGIT_BYTES = BYTES_16BIT + BYTES_FP32 + BYTES_FP32
# CUDA, not in torch's allocated count: the context and cuBLAS workspaces (a few hundred MB,
# depending on GPU and driver; 0.5 GiB is an allowance, not a measurement) and the caching
# allocator's fragmentation and block rounding, as a share of allocated.
CUDA_CONTEXT_BYTES = 0.5 * GIB
FRAGMENTATION = 0.10
# Share of a GPU's nominal memory a run can plan with: a Colab T4 sold as 16 GB shows 15,360 of
# 16,384 MiB (ECC on), and the driver keeps some.
USABLE_FRACTION = 0.94
# CPU: the interpreter with torch, transformers, peft, bitsandbytes, datasets, the tokenizer and
# the data loaded, before the model. `qorpo train` measures it (qorpo.sysmem.runtime_resident):
# two venvs of byte-identical packages on one machine held 498 and 596 MiB there (`import torch`
# alone: 219 vs 273 MiB resident, the same library code costing more resident pages in one),
# 532 with SmolLM2's tokenizer and real data. This constant is for `qorpo estimate`.
CPU_RUNTIME_BYTES = 533 * 2**20
# What a run then allocates that no component above counts: the model's modeling code and
# peft's tuners imported at load, the Trainer's first-step set-up (optimizer, autograd engine,
# lazy imports, library code first run). Measured: peak minus (measured runtime + components)
# for a tiny 8-layer model (tests/test_trust_inputs.py test_11, pinned thresholds) = 42.6 MiB
# in the lighter venv, 64.7 and 66.2 in the heavier one (it grows with the runtime's excess);
# 17 MiB where loading a 135M model is the peak. 76 leaves ~10 MiB above the largest.
CPU_START_BYTES = 76 * 2**20


class Workload(NamedTuple):
    """The tokens of one micro-batch as the model runs them."""

    rows: int  # R: 2 per pair (padded), 1 per pair (shared), fewer (packed)
    length: int  # L: positions per row, padding included
    scored: int  # N: tokens the loss projects to the vocabulary
    mask: bool  # a dense 4-D (R, 1, L, L) mask is built (unless nothing is padded, or a
    #             FlexAttention BlockMask replaces it)
    pair_attention: bool = False  # qorpo.attention's per-pair kernels (CPU): no float mask

    @property
    def tokens(self) -> int:
        """Positions run through every layer (padding included: it is computed too)."""
        return self.rows * self.length

    @classmethod
    def padded(cls, seq_len: int, pairs: int = 1) -> Workload:
        """2·pairs rows of seq_len, every token scored: the docs table's upper bound."""
        return cls(2 * pairs, seq_len, 2 * pairs * seq_len, mask=False)


class MemoryEstimate(NamedTuple):
    """Bytes per component. `total` is what the device must have; `naive_logits` is only for
    comparison (what the full-logits loss would add instead of `loss_path`)."""

    quantized_weights: float
    unquantized_weights: float  # embedding (+ head), norms
    lora_params: float
    lora_grads: float
    optimizer_states: float
    checkpoints: float  # each decoder layer's input, kept by gradient checkpointing
    layer_recompute: float  # one layer's working set during its backward (all layers without)
    attention_mask: float  # the (R, 1, L, L) boolean mask
    loss_path: float  # final hidden states, their gradients, chunked logits
    allowance: float  # CUDA: context + fragmentation; CPU: runtime + loading above the step
    naive_logits: float

    @property
    def allocated(self) -> float:
        """What the live tensors reach (CUDA: near torch.cuda.max_memory_allocated)."""
        return self.total - self.allowance

    @property
    def total(self) -> float:
        return sum(v for k, v in self._asdict().items() if k != "naive_logits")

    def gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 3) for k, v in self._asdict().items()}
        out["total"] = round(self.total / GIB, 3)
        return out


def _shape(model: ModelShape | str) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if model not in MODELS:
        raise KeyError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    return MODELS[model]


def estimate(model: ModelShape | str, seq_len: int = 0, *, pairs: int = 1, lora_r: int = 16,
             chunk_size: int = DEFAULT_CHUNK_SIZE, optim: str | None = None,
             device: str = "cuda", checkpointing: bool = True, lora_dropout: bool = True,
             workload: Workload | None = None, runtime: tuple[float, float] | None = None,
             ) -> MemoryEstimate:
    """Peak memory of one training step: `workload`, or `pairs` pairs padded to `seq_len`.
    CPU: `runtime` is the (resident, peak) bytes of the process that will train, measured before
    the model loads (qorpo.sysmem.runtime_resident); None: CPU_RUNTIME_BYTES."""
    m = _shape(model)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    work = workload or Workload.padded(seq_len, pairs)
    if work.rows < 1 or work.length < 1 or lora_r < 1 or chunk_size < 1:
        raise ValueError("seq_len, pairs, lora_r and chunk_size must be >= 1")
    optim = optim or ("paged_adamw_8bit" if device == "cuda" else "adamw_torch")
    if optim not in OPTIMIZER_STATE_BYTES:
        raise KeyError(f"unknown optimizer {optim!r}; known: {', '.join(OPTIMIZER_STATE_BYTES)}")
    if device == "cpu":
        return _cpu(m, work, lora_r, chunk_size, optim, checkpointing, lora_dropout, runtime)
    act = BYTES_16BIT
    tokens, lora = work.tokens, m.lora_params(lora_r)
    layer = tokens * m.layer_bytes_per_token(act)
    # final (fp32-normed) hidden states of every position, the gathered scored rows and their
    # gradient J (fp32), and the chunk buffers
    loss = (tokens + 2 * work.scored) * m.hidden * BYTES_FP32
    loss += min(chunk_size, max(work.scored, 1)) * m.vocab * BYTES_FP32 * CHUNK_BUFFERS
    parts = dict(
        quantized_weights=m.linear_params * NF4_BYTES_PER_PARAM,
        unquantized_weights=m.embedding_params * act + m.norm_params * BYTES_FP32,
        lora_params=lora * LORA_PARAM_BYTES,
        lora_grads=lora * LORA_GRAD_BYTES,
        optimizer_states=lora * OPTIMIZER_STATE_BYTES[optim],
        checkpoints=m.layers * tokens * m.hidden * act if checkpointing else 0.0,
        layer_recompute=layer if checkpointing else m.layers * layer,
        attention_mask=work.rows * work.length**2 if work.mask else 0.0,
        loss_path=loss,
    )
    allowance = CUDA_CONTEXT_BYTES + FRAGMENTATION * sum(parts.values())
    return MemoryEstimate(**parts, allowance=allowance,
                          naive_logits=work.tokens * m.vocab * NAIVE_LOGIT_BYTES)


def cpu_layer_bytes(m: ModelShape, length: int, lora_r: int, lora_dropout: bool = True,
                    pair_attention: bool = False) -> int:
    """Bytes autograd keeps per token for one decoder layer in fp32 (counted with
    saved_tensors_hooks on SmolLM2-135M and a 360M-shape Llama, then checked end to end against
    the step-peak slopes: 69,563 vs 69,612 and 115,522 vs 115,716 bytes/token/layer).

    8 H-wide tensors (the layer input, norm intermediates, six dropout masks), 4 I-wide (gate,
    up, SiLU(gate), the down projection's dropout mask), 6 H + 1 I dropout outputs (the LoRA A
    inputs), q, k, v and the attention output (4 H), the LoRA A outputs (7 r), the attention
    log-sum-exp (heads), two rsqrt; with a mask (always, in qorpo's layouts) K/V repeated to
    every head and the float mask SDPA makes from the boolean one (4 L per token; not with
    qorpo.attention's per-pair kernels, whose masks are (R, P + R) per pair). Without
    LoRA dropout peft feeds the layer input itself to lora_A: no masks, no dropout outputs.
    """
    h, i, kv = m.hidden, m.intermediate, m.kv_dim
    masked = 8 * (h - kv) + (0 if pair_attention else 4 * length)
    if lora_dropout:
        return 4 * (16 * h + 2 * kv + 5 * i + 7 * lora_r + m.heads + 2) + masked
    return 4 * (6 * h + 2 * kv + 4 * i + 7 * lora_r + m.heads + 2) + masked


def _cpu(m: ModelShape, work: Workload, lora_r: int, chunk_size: int, optim: str,
         checkpointing: bool, lora_dropout: bool,
         runtime: tuple[float, float] | None = None) -> MemoryEstimate:
    """Peak RSS on the CPU (fp32): the largest of loading the model and a training step, with
    the live tensors resident and nothing else (glibc's thresholds pinned)."""
    n, lora = work.tokens, m.lora_params(lora_r)
    dense = BYTES_FP32 * (m.embedding_params + m.norm_params)
    per_layer = cpu_layer_bytes(m, work.length, lora_r, lora_dropout, work.pair_attention)
    # gradients in flight at the backward's peak, per token: the gate/up gradients and the
    # residual stream's (measured: the step-peak slope minus the saved sets, within 5.6%)
    temps = BYTES_FP32 * (2 * m.intermediate + m.hidden)
    scored = max(work.scored, 1)
    loss_forward = (2 * BYTES_FP32 * min(chunk_size, scored) * m.vocab
                    + 3 * BYTES_FP32 * m.hidden * scored)
    if checkpointing:
        ckpt = BYTES_FP32 * m.hidden * m.layers * n
        backward = n * (per_layer + temps)
        forward = 2 * BYTES_FP32 * m.hidden * n + loss_forward
    else:
        ckpt = 0.0
        backward = n * (m.layers * per_layer + temps)
        forward = n * m.layers * per_layer + loss_forward
    parts = dict(
        quantized_weights=m.linear_params * NF4_BYTES_PER_PARAM,
        unquantized_weights=dense,
        lora_params=lora * LORA_PARAM_BYTES,
        lora_grads=lora * LORA_GRAD_BYTES,
        optimizer_states=lora * OPTIMIZER_STATE_BYTES[optim],
        checkpoints=ckpt,
        layer_recompute=backward,
        attention_mask=work.rows * work.length**2 if work.mask else 0.0,
        # the forward's loss buffers outlast the backward's peak only for tiny batches
        loss_path=max(0.0, forward - backward),
    )
    step = sum(parts.values())
    # Loading: the linear weights are read from the checkpoint's memory mapping (its pages
    # count in RSS, in the checkpoint's dtype) and quantised one by one; the dense weights are
    # copied out of the mapping into fp32 (qorpo.sysmem.release_file_mappings then drops it).
    mapped = m.checkpoint_bytes * (m.linear_params + m.embedding_params + m.norm_params)
    load = mapped + parts["quantized_weights"] + dense
    resident, peak = runtime or (CPU_RUNTIME_BYTES, 0.0)
    # the process's peak before the model loaded (reading the data, say) is a floor of its own
    allowance = max(resident + CPU_START_BYTES + max(0.0, load - step), peak - step)
    return MemoryEstimate(**parts, allowance=allowance,
                          naive_logits=n * m.vocab * NAIVE_LOGIT_BYTES)

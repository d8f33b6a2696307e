"""GPU memory estimate for a qorpo training run: a formula, not a measurement.

`estimate(model, seq_len)` adds up what a 4-bit QLoRA ORPO step keeps on the GPU, component by
component, so users can see *why* a configuration fits or not. Every constant below says where
it comes from. Nothing here has been checked against a GPU yet; `peak_memory_gb` in a run's
metrics.jsonl (torch.cuda.max_memory_allocated) is the number to compare with `allocated`.

Assumptions (qorpo's defaults): NF4 double-quant base, embedding and output head in 16 bits,
LoRA on every linear layer of the decoder, non-reentrant gradient checkpointing, SDPA/flash
attention (memory O(T)), the chunked loss, paged 8-bit AdamW, and every token scored (an upper
bound: only response tokens are). A batch of P pairs is 2P sequences of `seq_len` tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from qorpo.config import DEFAULT_CHUNK_SIZE

GIB = 2**30

# NF4 with double quantisation (bitsandbytes, blocksize 64): 4-bit codes, one 8-bit absmax per
# 64 weights, one fp32 absmax per 256 of those (the QLoRA paper's 0.127 bits/param overhead).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
BYTES_16BIT = 2  # bf16/fp16: the compute dtype; embedding and lm_head are kept in it
BYTES_FP32 = 4
# peft keeps LoRA weights in fp32 when the base computes in 16 bits (autocast_adapter_dtype),
# and their gradients are fp32 too.
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
# fp32 log-softmax that becomes the probabilities in place, and the 16-bit copy of the
# probabilities for the hidden-state gradient matmul (rounded up to a third fp32 buffer).
CHUNK_BUFFERS = 3
# The naive path (TRL-style: full logits -> log_softmax -> gather) holds the (2B, T, V) logits
# in 16 bits, their fp32 upcast and the fp32 log-softmax: 2 + 4 + 4 bytes per logit.
NAIVE_LOGIT_BYTES = BYTES_16BIT + BYTES_FP32 + BYTES_FP32
# Not in torch's allocated count: the CUDA context and cuBLAS workspaces (a few hundred MB,
# depending on GPU and driver; 0.5 GiB is an allowance, not a measurement) ...
CUDA_CONTEXT_BYTES = 0.5 * GIB
# ... and the caching allocator's fragmentation and block rounding, as a share of allocated.
FRAGMENTATION = 0.10
# A card sold as 16 GB shows 15,360 of 16,384 MiB on a Colab T4 (ECC on): count 94 % of the
# nominal size as usable. Cards that also drive a display have less.
USABLE_FRACTION = 0.94
CARD_SIZES_GB = (8, 12, 16, 24)
SEQ_LENS = (1024, 2048, 4096)
MAX_PAIRS = 16  # the table stops counting here: gradient accumulation is exact anyway


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a Llama/Mistral-style decoder that memory depends on."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool  # input embedding and output head share one matrix

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        """Parameters of all decoder linear layers: what bitsandbytes quantises."""
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus (if untied) the output head: never quantised."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, r: int) -> int:
        """LoRA A (r x in) and B (out x r) on every decoder linear layer ('all-linear')."""
        return self.layers * sum(r * (i + o) for i, o in self.linear_shapes())

    def layer_bytes_per_token(self) -> float:
        """One decoder layer's working set while it is recomputed and back-propagated, per token.

        Counted from what autograd keeps for a Llama-style layer with LoRA (dropout > 0) on every
        linear layer under 16-bit autocast; an estimate, rounded up where unsure:
        """
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        # two RMSNorms (fp32 weights after prepare_model_for_kbit_training): 16-bit input,
        # fp32 upcast, fp32 output
        norms = 2 * (2 + 4 + 4) * h
        # each LoRA layer: a bool dropout mask + the 16-bit copy of its input that lora_A saves
        lora_inputs = 3 * (4 * h + 2 * h + i)
        # q, k, v; RoPE'd q, k; K/V repeated to all heads (GQA); attention output (16-bit)
        attention = BYTES_16BIT * ((h + 2 * kv) + (h + kv) + 2 * h + h)
        attention_stats = BYTES_FP32 * self.heads  # SDPA/flash log-sum-exp: O(T), not O(T^2)
        mlp = BYTES_16BIT * 4 * i  # gate, SiLU(gate), up, their product
        # gradients in flight: two MLP-wide 16-bit and two hidden-wide fp32 tensors
        grads = 2 * BYTES_16BIT * i + 2 * BYTES_FP32 * h
        return norms + lora_inputs + attention + attention_stats + mlp + grads


# Shapes from each model's config.json on the hub.
MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("Llama-3.2-1B", 2048, 16, 8192, 128256, 32, 8, tied=True),
        ModelShape("Llama-3.2-3B", 3072, 28, 8192, 128256, 24, 8, tied=True),
        ModelShape("Mistral-7B-v0.1", 4096, 32, 14336, 32000, 32, 8, tied=False),
        ModelShape("Llama-3.1-8B", 4096, 32, 14336, 128256, 32, 8, tied=False),
    )
}


def shape_from_config(config: Any, name: str = "") -> ModelShape:
    """A ModelShape from a transformers config (Llama/Mistral/Qwen-style attribute names)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    return ModelShape(
        name=name or str(getattr(cfg, "_name_or_path", "") or cfg.model_type),
        hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
        intermediate=int(cfg.intermediate_size), vocab=int(cfg.vocab_size), heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


class MemoryEstimate(NamedTuple):
    """Bytes per component. `total` is what the GPU must have; `naive_logits` is only for
    comparison (what the full-logits loss would add instead of `loss_path`)."""

    quantized_weights: float
    unquantized_weights: float  # embedding (+ head), norms
    lora_params: float
    lora_grads: float
    optimizer_states: float
    checkpoints: float  # each decoder layer's input, kept by gradient checkpointing
    layer_recompute: float  # one layer's working set during its backward
    loss_path: float  # final hidden states, their gradients, chunked logits
    allowance: float  # CUDA context + allocator fragmentation
    naive_logits: float

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated should be near (no context, no fragmentation)."""
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


def estimate(model: ModelShape | str, seq_len: int, *, pairs: int = 1, lora_r: int = 16,
             chunk_size: int = DEFAULT_CHUNK_SIZE, optim: str = "paged_adamw_8bit",
             weight_bytes: int = BYTES_16BIT) -> MemoryEstimate:
    """Peak GPU memory of one training step: `pairs` preference pairs of `seq_len` tokens each."""
    m = _shape(model)
    if seq_len < 1 or pairs < 1 or lora_r < 1 or chunk_size < 1:
        raise ValueError("seq_len, pairs, lora_r and chunk_size must be >= 1")
    if optim not in OPTIMIZER_STATE_BYTES:
        raise KeyError(f"unknown optimizer {optim!r}; known: {', '.join(OPTIMIZER_STATE_BYTES)}")
    tokens = 2 * pairs * seq_len  # chosen and rejected rows, padded to seq_len
    lora = m.lora_params(lora_r)
    hidden_row = tokens * m.hidden
    # final (fp32-normed) hidden states, the gathered scored rows, and their gradient J (fp32)
    loss_hidden = 3 * hidden_row * BYTES_FP32
    chunk = min(chunk_size, tokens) * m.vocab * BYTES_FP32 * CHUNK_BUFFERS
    parts = dict(
        quantized_weights=m.linear_params * NF4_BYTES_PER_PARAM,
        unquantized_weights=m.embedding_params * weight_bytes + m.norm_params * BYTES_FP32,
        lora_params=lora * LORA_PARAM_BYTES,
        lora_grads=lora * LORA_GRAD_BYTES,
        optimizer_states=lora * OPTIMIZER_STATE_BYTES[optim],
        checkpoints=m.layers * hidden_row * weight_bytes,
        layer_recompute=tokens * m.layer_bytes_per_token(),
        loss_path=loss_hidden + chunk,
    )
    allocated = sum(parts.values())
    allowance = CUDA_CONTEXT_BYTES + FRAGMENTATION * allocated
    naive = tokens * m.vocab * NAIVE_LOGIT_BYTES
    return MemoryEstimate(**parts, allowance=allowance, naive_logits=naive)


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
    lines = ["Estimates (formula in qorpo/memory.py), not measurements.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows():
        cells = [r.model, f"{r.params_b:.2f} B", f"{r.seq_len:,}", f"{r.total_gib:.1f}",
                 *[_cell(r.max_pairs[f"{gb}GB"]) for gb in CARD_SIZES_GB],
                 f"{r.naive_logits_gib:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Breakdown at 2,048 tokens, 1 pair (GiB):", ""]
    parts = list(MemoryEstimate._fields[:-1])
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
        "source": "estimate (formula in qorpo/memory.py)", "measured_on_gpu": False,
        "assumptions": {"lora_r": 16, "chunk_size": DEFAULT_CHUNK_SIZE,
                        "optim": "paged_adamw_8bit", "weights": "NF4 double quant",
                        "cuda_context_gib": CUDA_CONTEXT_BYTES / GIB,
                        "fragmentation": FRAGMENTATION, "usable_fraction": USABLE_FRACTION},
        "models": {k: asdict(v) for k, v in MODELS.items()},
        "rows": [r._asdict() for r in table_rows()],
    })

"""How a laid-out batch goes through the model: which attention mask the model's attention
implementation takes, the final hidden states, whether a model can take the shared/packed
layouts at all, and the start-up parity check.

transformers (5.x) passes a 4-D mask through untouched to the attention function
(masking_utils._preprocess_mask_arguments): `sdpa` takes it as a boolean "may attend" mask,
`eager` ADDS it to the scores (a boolean mask there would be silently wrong: it gets
`additive_mask`), FlexAttention wants a BlockMask, and flash attention's varlen kernels can only
express block-diagonal masks — not "rejected sees the prompt but not the chosen tokens". It
detects packed sequences from position_ids only when attention_mask is None, so the 4-D mask
is always passed (a BlockMask for flex_attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from qorpo.attention import NAME as PAIR_ATTENTION
from qorpo.attention import pair_spans
from qorpo.data.collate import CHOSEN, LAYOUTS, PAD, REJECTED, Batch, Layout, Pair, build_batch
from qorpo.errors import ModelError
from qorpo.loss import chunked_token_logps
from qorpo.model import final_hidden_states, output_head, supports_logits_to_keep, unwrap
from qorpo.quant import keep_4bit_differentiable

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean may-attend mask → additive float mask (0 where allowed, dtype min elsewhere), the
    form eager attention adds to its scores. finfo.min, not −inf: rows are never fully masked,
    and −inf − −inf would be NaN in reductions anyway."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def mixed_precision(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """The autocast the Trainer runs the model under (accelerate's bf16/fp16 mixed precision),
    for forwards outside it (the start-up checks). A 16-bit run mixes dtypes on purpose:
    prepare_model_for_kbit_training keeps the norms in fp32 and peft the LoRA weights, so the
    hidden states leave the first norm in fp32 while the embedding and the head stay 16-bit;
    without autocast the head's matmul fails (fp32 input, bf16 weight). The compute dtype is
    the input embedding's (qorpo.model.add_lora puts it there); fp32 runs get no autocast."""
    dtype = compute_dtype(model)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device = unwrap(model).get_input_embeddings().weight.device
    return torch.autocast(device.type, dtype=dtype)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the matmuls run in: the input embedding's when 16-bit, else fp32. Not the
    dtype the hidden states come out in: under a 16-bit QLoRA run the final norm is fp32, so
    fp32 hidden states carry bf16 rounding, and checks must allow for that."""
    weight = getattr(unwrap(model).get_input_embeddings(), "weight", None)
    if weight is None or weight.dtype not in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight.dtype


def _text_config(model: nn.Module) -> Any:
    cfg = unwrap(model).config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def attn_implementation(model: nn.Module) -> str:
    return str(getattr(_text_config(model), "_attn_implementation", None) or "eager")


def model_attention_mask(model: nn.Module, batch: Batch) -> torch.Tensor | BlockMask:
    """The `attention_mask` to pass for this model's attention implementation: padded → 2-D
    (the model builds its own); sdpa → (R, 1, L, L) bool; eager → additive, in the dtype of
    the model's embeddings (the scores' dtype); flex_attention → a BlockMask (O(tokens), and
    its kernels skip the blocks it masks out: the GPU's counterpart of qorpo.attention)."""
    if batch.layout == "padded":
        return batch.attention_mask()
    impl = attn_implementation(model)
    if impl in ("sdpa", PAIR_ATTENTION):
        return batch.dense_mask()
    if impl == "flex_attention":
        return flex_block_mask(batch)
    if impl == "eager":
        emb = unwrap(model).get_input_embeddings()
        weight = getattr(emb, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        return additive_mask(batch.dense_mask(), dtype or torch.float32)
    raise ValueError(f"the {batch.layout} layout needs sdpa, eager or flex_attention, the "
                     f"model uses {impl}; see supports_layout")


def hidden_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(R, L, H) final (post-norm) hidden states of a laid-out batch (on the model's device),
    through every wrapper's own forward (qorpo.model.final_hidden_states)."""
    extra = {}
    if batch.layout != "padded" and attn_implementation(model) == PAIR_ATTENTION:
        extra["qorpo_spans"] = pair_spans(batch)  # see qorpo.attention
    return final_hidden_states(model, batch.input_ids, model_attention_mask(model, batch),
                               batch.position_ids, **extra)


FLEX_BLOCK = 128  # FlexAttention's default sparse block (query and key/value tiles)


def flex_block_mask(batch: Batch) -> BlockMask:
    """A FlexAttention BlockMask for a shared/packed batch, on the batch's device.

    Built from the (R, L) `segment_ids`/`part` only, in O(R · (L/128)²) memory: torch's
    create_block_mask (uncompiled) would evaluate the mask_mod on the dense (R, L, L) grid,
    with int64 intermediates — 8 bytes per (query, key), more than the dense bool mask this
    replaces. `flex_blocks` classifies the 128 × 128 tiles instead (tests/test_flex.py checks
    it against create_block_mask). transformers' flex_attention_forward takes a BlockMask passed
    as `attention_mask` directly (a tensor there is ADDED to the scores as a float score_mod).
    One per micro-batch: every layer, and the recomputation under gradient checkpointing, get
    the same object.
    """
    from torch.nn.attention.flex_attention import BlockMask

    seg, part = batch.segment_ids, batch.part.long()
    length = seg.shape[1]
    partial, full = flex_blocks(seg, part, FLEX_BLOCK)  # (R, nQ, nK) each

    def as_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # per query tile: how many key tiles, and their indices first (the rest is unused)
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = as_indices(partial)  # (R, 1, nQ), (R, 1, nQ, nK)
    full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=flex_mask_mod(seg, part),
                                    seq_lengths=(length, length))


def flex_blocks(segment_ids: torch.Tensor, part: torch.Tensor,
                block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): (R, nQ, nK) bool tiles of the may-attend rule of `Batch.dense_mask`.
    A tile is empty when no query in it may see a key in it, full when every one may, partial
    otherwise (the kernel evaluates the mask_mod there and skips empty tiles).

    Exact, from per-tile ranges of run numbers: segments are contiguous runs of a row (tail
    padding its own segment), numbered here in row order, and each has at least one prompt,
    chosen and rejected token, so the runs of one part that a tile holds are a contiguous range
    too. Below the diagonal
    every key precedes every query: a tile pair is non-empty when non-rejected queries share a
    segment with any key, or rejected queries with a non-chosen key. A diagonal tile always is
    (each token sees itself)."""
    rows, length = segment_ids.shape
    n = -(-length // block)
    extra = n * block - length  # the last tile's missing positions repeat the last column
    # number the runs of each row in order (segment ids are pair numbers, in any order)
    runs = torch.cat([torch.zeros_like(segment_ids[:, :1]),
                      (segment_ids[:, 1:] != segment_ids[:, :-1]).long()], 1).cumsum(1)
    seg = torch.cat([runs, runs[:, -1:].expand(rows, extra)], 1).view(rows, n, block)
    prt = torch.cat([part, part[:, -1:].expand(rows, extra)], 1).view(rows, n, block)
    pad, rej, cho = prt == PAD, prt == REJECTED, prt == CHOSEN
    big = torch.iinfo(seg.dtype).max

    def span(where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (R, n) each; lo > hi
        return (seg.masked_fill(~where, big).amin(-1),  # when the tile has no such token
                seg.masked_fill(~where, -big).amax(-1))

    def overlap(q: tuple[torch.Tensor, torch.Tensor],
                k: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # (R, nQ, nK)
        return (q[0][:, :, None].maximum(k[0][:, None, :])
                <= q[1][:, :, None].minimum(k[1][:, None, :]))

    real = ~pad
    has_pad = pad.any(-1)
    below = overlap(span(real & ~rej), span(real)) | overlap(span(rej), span(real & ~cho))
    below |= has_pad[:, :, None] & has_pad[:, None, :]  # padding sees padding
    idx = torch.arange(n, device=seg.device)
    lower = idx[:, None] > idx[None, :]  # (nQ, nK): every key before every query
    nonempty = (below & lower) | torch.eye(n, dtype=torch.bool, device=seg.device)
    # full: one segment in both tiles (the same one), no rejected query and chosen key, below
    # the diagonal, and no position past the end
    first = seg[..., 0]  # (R, n)
    single = (seg == first[..., None]).all(-1)
    whole = torch.ones(n, dtype=torch.bool, device=seg.device)
    whole[-1] = extra == 0
    full = (lower & whole[:, None] & whole[None, :]
            & single[:, :, None] & single[:, None, :] & (first[:, :, None] == first[:, None, :])
            & ~(rej.any(-1)[:, :, None] & cho.any(-1)[:, None, :]))
    return nonempty & ~full, full


def flex_mask_mod(segment_ids: torch.Tensor, part: torch.Tensor) -> Any:
    """The may-attend rule of `Batch.dense_mask` as a FlexAttention mask_mod(b, h, q, kv)."""

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        same = segment_ids[b, q] == segment_ids[b, kv]
        blind = (part[b, q] == REJECTED) & (part[b, kv] == CHOSEN)
        return same & (kv <= q) & ~blind

    return mask_mod


class LayoutSupport(NamedTuple):
    ok: bool
    reason: str  # one line: why not, or what was checked


# Model types whose decoder passes a 4-D mask through untouched (transformers' mask helpers)
# and uses position_ids only for RoPE, as verified on tiny configs in tests/test_layout.py
# (transformers 5.24). Only consulted with probe=False; anything else needs the probe.
KNOWN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"})


def _sliding_window(cfg: Any) -> tuple[int | None, str | None]:
    """(window of the model's sliding-window layers or None, a reason it cannot be handled)."""
    kinds = set(getattr(cfg, "layer_types", None) or [])
    other = kinds - {"full_attention", "sliding_attention"}
    if other:
        return None, (f"layer types {sorted(other)} (chunked/linear/recurrent attention) do not "
                      "take a custom mask")
    if getattr(cfg, "attention_chunk_size", None):
        return None, "chunked attention (attention_chunk_size) does not take a custom mask"
    window = getattr(cfg, "sliding_window", None)
    if kinds and "sliding_attention" not in kinds:
        return None, None  # e.g. Qwen2/3 with use_sliding_window=False: every layer is full
    if getattr(cfg, "use_sliding_window", True) is False:
        return None, None
    return (int(window) if window else None), None


def supports_layout(
    model: nn.Module,
    layout: Layout = "shared",
    *,
    max_seq_len: int | None = None,
    probe: bool = True,
) -> LayoutSupport:
    """Whether `layout` gives this model the same hidden states as the padded layout.

    Static checks: attention implementation (sdpa/eager take a custom 4-D mask, flex_attention
    a BlockMask; flash
    attention's varlen kernels only do block-diagonal masks, so they cannot let rejected tokens
    see the prompt but not the chosen tokens), sliding-window/chunked/linear layers (a 4-D mask
    replaces the model's own sliding-window mask, which is only harmless when no sequence is
    longer than the window: pass `max_seq_len`, i.e. max_length). Then, with `probe`, one tiny
    no-grad forward of 3 made-up pairs in both layouts must give the same hidden states at
    every scored position: this catches models that ignore or rebuild custom masks, or ignore
    position_ids. The probe runs in eval mode (restored after); on CPU bitsandbytes 4-bit
    layers are first kept differentiable, as qorpo.model.keep_4bit_differentiable does.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "padded":
        return LayoutSupport(True, "padded: the model builds its own masks")
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", "?")
    impl = attn_implementation(model)
    if "flash" in impl:
        return LayoutSupport(False, f"{impl}: varlen kernels take only block-diagonal masks; a "
                             "shared prompt needs a custom mask (use sdpa)")
    if impl not in ("sdpa", "eager", "flex_attention", PAIR_ATTENTION):
        return LayoutSupport(False, f"attention implementation {impl!r} is not known to take "
                             "a custom 4-D mask (use sdpa)")
    window, why = _sliding_window(cfg)
    if why:
        return LayoutSupport(False, f"{model_type}: {why}")
    if window is not None and (max_seq_len is None or max_seq_len > window):
        size = "unknown" if max_seq_len is None else str(max_seq_len)
        return LayoutSupport(False, f"{model_type}: sliding-window attention (window {window}) "
                             f"and sequences of {size} tokens: a custom mask would turn it into "
                             "full attention")
    if not probe:
        if model_type not in KNOWN_MODEL_TYPES:
            return LayoutSupport(False, f"{model_type}: not verified with custom masks; run "
                                 "supports_layout(..., probe=True)")
        return LayoutSupport(True, f"{model_type} with {impl}: known to take a custom mask")
    try:
        err, tol = probe_layout(model, layout)
    except Exception as exc:  # a model that rejects the mask/position_ids in any way
        return LayoutSupport(False, f"{model_type} with {impl}: the {layout} probe failed: "
                             f"{type(exc).__name__}: {exc}"[:300])
    if not err <= tol:  # also catches NaN
        return LayoutSupport(False, f"{model_type} with {impl}: {layout} hidden states differ "
                             f"from padded by {err:.2g} (relative; tolerance {tol:g}): it "
                             "ignores or rebuilds custom masks or position_ids")
    return LayoutSupport(True, f"{model_type} with {impl}: {layout} probe matches padded "
                         f"(relative diff {err:.1g})")


# Odd shapes on purpose: a one-token prompt, a one-token response, chosen longer and shorter
# than rejected. Packed into rows of PROBE_ROW_TOKENS, the two longest pairs share a row.
PROBE_SHAPES = ((3, 2, 4), (1, 3, 1), (2, 1, 2))
PROBE_ROW_TOKENS = 9 + 5


def probe_pairs(model: nn.Module,
                shapes: tuple[tuple[int, int, int], ...] = PROBE_SHAPES) -> list[Pair]:
    """Made-up (prompt, chosen, rejected) token ids of these shapes, in the model's vocab."""
    vocab = int(getattr(_text_config(model), "vocab_size", 0) or 0)
    if vocab < 2:
        raise ValueError("no vocab_size in the model config")
    gen = torch.Generator().manual_seed(1234)
    return [tuple(torch.randint(0, vocab, (n,), generator=gen).tolist() for n in shape)
            for shape in shapes]


def probe_layout(model: nn.Module, layout: Layout) -> tuple[float, float]:
    """(max |h_layout − h_padded| / max |h_padded| over scored positions, tolerance)."""
    pairs = probe_pairs(model)
    device = unwrap(model).get_input_embeddings().weight.device
    kw: dict[str, Any] = {"pad_token_id": 0, "sft_on_prompt": True}
    ref = build_batch(pairs, "padded", **kw).to(device)
    got = build_batch(pairs, layout, max_row_tokens=PROBE_ROW_TOKENS, **kw).to(device)
    keep_4bit_differentiable(model)  # before any eval-mode no-grad forward (see qorpo.quant)
    with evaluating(model), mixed_precision(model):
        h_ref = hidden_states(model, ref)
        h_got = hidden_states(model, got)
    tol = 1e-4 if compute_dtype(model) == torch.float32 else 3e-2  # relative
    a = h_ref.flatten(0, 1)[ref.score_index].float()  # (N, H): same order in both layouts
    g = h_got.flatten(0, 1)[got.score_index].float()
    return float((g - a).abs().max() / a.abs().max().clamp(min=1e-6)), tol


# ----------------------------------------------------------------------------- parity check
PARITY_PAIRS = 2  # real pairs checked at start-up
PARITY_TOKENS = 48  # of each part: the prompt's last tokens, each response's first
class ParityReport(NamedTuple):
    max_abs_diff: float  # chunked log-probs vs the model's own logits (padded layout)
    layout_diff: float  # the chosen layout's log-probs vs the padded layout's (0 for padded)
    tolerance: float
    tokens: int


def parity_check(model: nn.Module, pairs: list[Pair], layout: Layout, pad_token_id: int,
                 dtype: torch.dtype) -> ParityReport:
    """On real pairs, before the first step: (1) chunked log-probs from hidden states equal the
    log-probs of the model's own logits, and (2) the layout the run uses scores every token as
    the padded layout does. Catches heads that do more than lm_head (+ softcap/scale) and
    models that do not take a custom mask, before a training step is wasted on a wrong loss."""
    arch = type(unwrap(model)).__name__
    if not supports_logits_to_keep(model):
        raise ModelError(f"{arch}: its forward has no `logits_to_keep`, so qorpo cannot avoid "
                         "computing full logits; this architecture is not supported")
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.05}.get(dtype, 0.1)
    device = next(model.parameters()).device
    # Short pieces of real pairs (the prompt's end, the responses' starts, boundaries
    # included): the model's full logits are (rows, length, vocab) — 1.6 GB for 4 pairs of 512
    # tokens at a 49k vocab — and the check needs none of that length.
    pairs = [(list(p)[-PARITY_TOKENS:], list(c)[:PARITY_TOKENS], list(r)[:PARITY_TOKENS])
             for p, c, r in pairs[:PARITY_PAIRS]]
    # sft_on_prompt: score the prompt tokens too, so every token is checked
    padded = build_batch(pairs, "padded", pad_token_id=pad_token_id,
                         sft_on_prompt=True).to(device)
    keep_4bit_differentiable(model)
    with evaluating(model), mixed_precision(model):
        full = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask(),
                     use_cache=False)
        spec = padded.spec
        logits = full.logits.flatten(0, 1)[spec.index].float()  # (N, V)
        ref = logits.gather(1, spec.target[:, None]).squeeze(1) - logits.logsumexp(-1)  # (N,)
        h = hidden_states(model, padded).flatten(0, 1)[spec.index]  # (N, H)
        got = chunked_token_logps(h, output_head(model), spec.target)
        layout_diff = 0.0
        if layout != "padded":  # the same tokens, in the same order, in every layout
            laid = build_batch(pairs, layout, pad_token_id=pad_token_id,
                               sft_on_prompt=True).to(device)
            h_laid = hidden_states(model, laid).flatten(0, 1)[laid.spec.index]  # (N, H)
            ours = chunked_token_logps(h_laid, output_head(model), laid.spec.target)
            layout_diff = (ours - got).abs().max().item()
    diff = (got - ref).abs().max().item() if len(ref) else 0.0
    if not diff <= tol:  # also catches NaN
        raise ModelError(
            f"{arch}: parity check failed — log-probs from hidden states and the output head "
            f"differ from the model's own logits by {diff:.3g} (tolerance {tol:g} for {dtype}). "
            "This architecture transforms its logits in a way qorpo does not reproduce; "
            "please report it.")
    if not layout_diff <= tol:
        raise ModelError(
            f"{arch}: the {layout} layout scores pairs differently from the padded layout (by "
            f"{layout_diff:.3g}); run with --no-prefix-sharing and please report it.")
    return ParityReport(diff, layout_diff, tol, int(len(ref)))

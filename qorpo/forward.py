"""How a laid-out batch goes through the model: its final hidden states (with the mask and
kernel arguments qorpo.attention gives it), whether a model can take the shared/packed layouts
at all, and the start-up parity check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from qorpo.attention import FLEX, PAIR_ATTENTION
from qorpo.attention.masks import attn_implementation, model_attention_mask
from qorpo.attention.pairs import pair_spans
from qorpo.data.collate import Batch, Layout, Pair, build_batch
from qorpo.data.placement import LAYOUTS
from qorpo.errors import ModelError
from qorpo.hf import text_config
from qorpo.loss import chunked_token_logps
from qorpo.model import final_hidden_states, output_head, supports_logits_to_keep, unwrap
from qorpo.quant import keep_4bit_differentiable


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


def hidden_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(R, L, H) final (post-norm) hidden states of a laid-out batch (on the model's device),
    through every wrapper's own forward (qorpo.model.final_hidden_states)."""
    extra = {}
    if batch.layout != "padded" and attn_implementation(model) == PAIR_ATTENTION:
        extra["qorpo_spans"] = pair_spans(batch)  # see qorpo.attention.pairs
    return final_hidden_states(model, batch.input_ids, model_attention_mask(model, batch),
                               batch.position_ids, **extra)


class LayoutSupport(NamedTuple):
    ok: bool
    reason: str  # one line: why not, or what was checked


# Model types whose decoder passes a 4-D mask through untouched (transformers' mask helpers)
# and uses position_ids only for RoPE, as verified on tiny configs in tests/test_layout.py
# (transformers 5.24). Only consulted with probe=False; anything else needs the probe.
KNOWN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"})


def _layer_problem(cfg: Any) -> str | None:
    """Why the model's layers cannot take qorpo's masks, or None. Full and sliding-window layers
    can (qorpo.attention.masks puts each layer's window in its mask); chunked, linear and
    recurrent ones build their own structure, which a custom mask cannot express."""
    other = set(getattr(cfg, "layer_types", None) or []) - {"full_attention",
                                                            "sliding_attention"}
    if other:
        return (f"layer types {sorted(other)} (chunked/linear/recurrent attention) do not take "
                "a custom mask")
    if getattr(cfg, "attention_chunk_size", None):
        return "chunked attention (attention_chunk_size) does not take a custom mask"
    return None


def supports_layout(
    model: nn.Module,
    layout: Layout = "shared",
    *,
    max_seq_len: int | None = None,
    probe: bool = True,
) -> LayoutSupport:
    """Whether `layout` gives this model the same hidden states as the padded layout.

    Static checks: attention implementation (sdpa/eager take a custom 4-D mask, flex_attention
    a BlockMask; flash attention's varlen kernels only do block-diagonal masks, so they cannot
    let rejected tokens see the prompt but not the chosen tokens), chunked/linear layers (they
    build their own structure). Sliding-window layers are fine at any length: each layer's mask
    carries its window (qorpo.attention.masks), so `max_seq_len` no longer matters (kept for
    callers). Then, with `probe`, one tiny no-grad forward of 3 made-up pairs in both layouts
    must give the same hidden states at every scored position: this catches models that ignore
    or rebuild custom masks (or a dict of them per layer type), or ignore position_ids. The
    probe runs in eval mode (restored after); on CPU bitsandbytes 4-bit layers are first kept
    differentiable, as qorpo.model.keep_4bit_differentiable does.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "padded":
        return LayoutSupport(True, "padded: the model builds its own masks")
    cfg = text_config(unwrap(model).config)
    model_type = getattr(cfg, "model_type", "?")
    impl = attn_implementation(model)
    if "flash" in impl:
        return LayoutSupport(False, f"{impl}: varlen kernels take only block-diagonal masks; a "
                             "shared prompt needs a custom mask (use sdpa)")
    if impl not in ("sdpa", "eager", FLEX, PAIR_ATTENTION):
        return LayoutSupport(False, f"attention implementation {impl!r} is not known to take "
                             "a custom 4-D mask (use sdpa)")
    why = _layer_problem(cfg)
    if why:
        return LayoutSupport(False, f"{model_type}: {why}")
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
    vocab = int(getattr(text_config(unwrap(model).config), "vocab_size", 0) or 0)
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
# fp32 tolerance on the head's log-probs; 16-bit runs get their matmul dtype's rounding
PARITY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.05}

# Why the reference is log_softmax of the model's logits, not z_t − logsumexp(z).
#
# log p_t = z_t − m − log S, S = Σ_v exp(z_v − m). In fp32 (u = 2⁻²⁴) a rounded sum of V
# positive terms has relative error ≤ (n − 1)·u for n terms added in sequence, and log S inherits
# it as an absolute error. torch's CPU log_softmax adds the V exponentials in one fp32 accumulator
# per SIMD lane (16 lanes with AVX-512, 8 with AVX2, 4 with NEON): n = V/lanes = 16,384-65,536 at
# Gemma 3's V = 262,144, a bound of 1e-3-4e-3. The bound is nearly reached, not a worst case
# that never happens: a real LM's distribution has one or a few terms near 1 and a long tail
# (Gemma 3 270M: 158,886 of 262,144 terms below 2⁻²⁵, 3.2e-4 of S), and once a lane's sum is ~1
# each tail term below half its ulp is rounded away, always downwards. So log S comes out low
# and log p high by a bias that grows with V and with fewer lanes. torch.logsumexp sums with
# torch.sum's cascade (error ~u·log V).
# Measured on Gemma 3 270M (fp32 and 4-bit alike), 262 tokens, against an fp64 log-softmax of
# the same hidden states and head: the loss's log_softmax is off by 6.2e-5 (AVX-512) / 1.2e-4
# (AVX2); z_t − logsumexp by 8.5e-6 / 1.2e-5; the fp32 logits themselves by ≤ 2.4e-5. The
# check used to compare the two reductions, so it failed at 1.2e-4-1.5e-4 on AVX2 machines
# with a correct head (issue 19) and would fail more at larger V. The head was never wrong: the
# model's logits and ours are bitwise equal here. Comparing like with like leaves the check
# what it is for — a head transform that qorpo does not reproduce (a softcap, a scale, a bias)
# moves log-probs by ~1e-2 or more — and keeps the 1e-4 fp32 tolerance (in 16-bit the logits
# themselves carry the matmul's rounding). The loss's bias (≤ 1.2e-4 per token on AVX2, the
# same sign for every token) is far below anything training can notice.


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
    tol = PARITY_TOLERANCE.get(dtype, 0.1)
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
        # the same fp32 reduction as the loss (see above), so `diff` measures the head alone
        ref = torch.log_softmax(logits, -1).gather(1, spec.target[:, None]).squeeze(1)  # (N,)
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

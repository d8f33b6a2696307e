"""ORPO loss, computed from hidden states in chunks: the `(rows, T, vocab)` logits never exist.

Pure tensor math: no I/O, no model classes, no trainer state.

Conventions (users ask about these):

* ℓ (a sequence's log-probability) is the **mean** log-prob over its **response** tokens
  (everything after the prompt, including the final end-of-turn/EOS token). The prompt and the
  padding are never projected to the vocabulary.
* odds(y) = P / (1 − P) with P = exp(ℓ), so
  log odds(y_w) − log odds(y_l) = (ℓw − ℓl) − (log1mexp(ℓw) − log1mexp(ℓl)), computed in fp32.
* L_OR = −log σ(log odds ratio) per pair; loss = nll + β · mean(L_OR), β (the paper's λ) = 0.1.
* nll is the token-mean negative log-likelihood of the chosen **response** tokens. With
  `sft_on_prompt=True` the chosen prompt tokens are scored too (TRL and the official ORPO code do
  this), so their numbers can be reproduced. ℓ is response-only either way.
* Rewards, as TRL logs them: β · ℓ. reward accuracy = mean(ℓw > ℓl); margin = mean(β(ℓw − ℓl)).
* Gradient accumulation: `orpo_loss` normalises the NLL by `num_nll_tokens` and the odds-ratio
  term by `num_pairs`. Pass the totals over the whole accumulation window (and all devices) and
  the sum of the micro-batch losses is exactly the loss of one big batch, so k micro-batches of
  b pairs give the gradient of one batch of k·b pairs. Left at None, they are this batch's own.
* A pair with zero response tokens is an error: ℓ would be 0/0. The data pipeline drops them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qorpo.config import DEFAULT_CHUNK_SIZE

_LN2 = math.log(2.0)
# Mean log-probs are clamped below this before log1mexp: at exactly 0 (fp32 certainty) the log
# odds would be +inf and its gradient NaN. P = exp(-1e-6) is 0.999999: the clamp never binds on a
# model that is still learning.
LOGP_CEIL = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate everywhere (Mächler 2012).

    Near 0, `log(-expm1(x))`; below −ln 2, `log1p(-exp(x))`. Each branch's input is clamped to
    its own range so the unused branch cannot produce inf/NaN gradients through `torch.where`.
    """
    near0 = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near0, far)


class OutputHead(NamedTuple):
    """The model's vocabulary projection and what it does to the logits after it.

    logits = softcap · tanh(logit_scale · (h Wᵀ + b) / softcap)   (softcap None: no tanh)
    Cohere's `logit_scale` multiplies; Granite's `logits_scaling` divides (pass 1/scaling);
    Gemma-2/3 `final_logit_softcapping` is `softcap`.
    """

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None  # (V,)
    logit_scale: float = 1.0
    softcap: float | None = None


def _chunk_logits(h: torch.Tensor, head: OutputHead) -> torch.Tensor:
    # Matmul in the model's dtype (tensor cores); everything after it in fp32.
    w = head.weight
    z = F.linear(h.to(w.dtype), w, head.bias).float()  # (c, V)
    if head.logit_scale != 1.0:
        z.mul_(head.logit_scale)
    if head.softcap is not None:
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    return z


class _ChunkGrad(NamedTuple):
    logp: torch.Tensor  # (c,) log p(target)
    probs: torch.Tensor  # (c, V) softmax, times the softcap chain factor when capped
    coef: torch.Tensor | float  # (c,) the chain factor at the target (1.0 without softcap)


def _chunk_grad(z: torch.Tensor, targets: torch.Tensor, head: OutputHead) -> _ChunkGrad:
    """log p(target) and the pieces of d log p / d raw logits = scale·(coef·onehot − probs).

    Memory-bound work dominates here (the matmul is the only compute-bound step), so it is one
    fused log_softmax plus one in-place exp; the one-hot is never materialised — callers add
    W[target] (or index_add into dW) instead of scattering into the (c, V) buffer.
    """
    ls = torch.log_softmax(z, dim=-1)  # (c, V)
    logp = ls.gather(1, targets[:, None]).squeeze(1)
    probs = ls.exp_()
    coef: torch.Tensor | float = 1.0
    if head.softcap is not None:
        # z = cap·tanh(u): dz/du = 1 − tanh² = 1 − (z/cap)², reusing z's buffer
        chain = z.div_(head.softcap).square_().neg_().add_(1.0)
        probs.mul_(chain)
        coef = chain.gather(1, targets[:, None]).squeeze(1)
    return _ChunkGrad(logp, probs, coef)


def _grad_hidden(g: _ChunkGrad, targets: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """d log p(target) / d h for each row of a chunk: scale·(coef·W[t] − probs @ W), (c, H)."""
    w = head.weight
    coef = g.coef[:, None] if isinstance(g.coef, torch.Tensor) else g.coef
    out = (w[targets].float() * coef).sub_((g.probs.to(w.dtype) @ w).float())
    return out.mul_(head.logit_scale) if head.logit_scale != 1.0 else out


class _ChunkedLogp(torch.autograd.Function):
    """log p(target) per row, chunk by chunk.

    Frozen head (the common case): the forward also computes each row's gradient w.r.t. its own
    hidden state, J_i = d log p_i / d h_i (N, H), because row i's output depends on row i only;
    backward is then J scaled by the incoming gradient. Two matmuls in all, like the
    full-logits path, and no recompute. Trainable head/bias: the backward recomputes each
    chunk's logits, since dW needs the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logit_scale, softcap, chunk_size):
        head = OutputHead(weight, bias, logit_scale, softcap)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        eager = need_h and not need_w
        jac = torch.empty_like(hidden) if eager else None  # (N, H)
        for s in range(0, n, chunk_size):
            h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
            z = _chunk_logits(h, head)  # (c, V) fp32
            if eager:
                g = _chunk_grad(z, t, head)
                out[s:s + chunk_size] = g.logp
                jac[s:s + chunk_size] = _grad_hidden(g, t, head)  # cast to hidden's dtype
                del g
            else:
                out[s:s + chunk_size] = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1)
            del z
        ctx.chunk_size, ctx.logit_scale, ctx.softcap, ctx.eager = (
            chunk_size, logit_scale, softcap, eager)
        if eager:
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.eager:
            (jac,) = ctx.saved_tensors
            return jac * grad_out[:, None].to(jac.dtype), None, None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        head = OutputHead(weight, bias, ctx.logit_scale, ctx.softcap)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        c = ctx.chunk_size
        for s in range(0, hidden.shape[0], c):
            h, t, go = hidden[s:s + c], targets[s:s + c], grad_out[s:s + c].float()
            g = _chunk_grad(_chunk_logits(h, head), t, head)
            if need_h:
                gh[s:s + c] = _grad_hidden(g, t, head).mul_(go[:, None])
            if need_w or need_b:
                # d/draw = scale·(coef·onehot − probs) · go, without building the one-hot
                row = go * g.coef * head.logit_scale  # (c,)
                g.probs.mul_((go * head.logit_scale)[:, None])
                if need_w:
                    hf = h.float()
                    gw.index_add_(0, t, hf * row[:, None]).addmm_(g.probs.t(), hf, alpha=-1.0)
                if need_b:
                    gb.index_add_(0, t, row).sub_(g.probs.sum(0))
            del g
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None


def chunked_token_logps(
    hidden: torch.Tensor,
    head: OutputHead,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log p(target) for each row of `hidden` (N, H) → fp32 (N,), at most `chunk_size` rows of
    logits alive at once (extra memory O(chunk_size × V), independent of N).

    Gradients flow to `hidden` and, only if they require grad, to `head.weight`/`head.bias`.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H) and targets (N,), got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLogp.apply(hidden, head.weight, head.bias, targets, float(head.logit_scale),
                              head.softcap, chunk_size)


class PairLogps(NamedTuple):
    """Log-prob statistics of a batch of B pairs: all a loss needs, nothing else."""

    chosen_sum: torch.Tensor  # (B,) sum of response-token log-probs
    chosen_count: torch.Tensor  # (B,) response tokens
    rejected_sum: torch.Tensor  # (B,)
    rejected_count: torch.Tensor  # (B,)
    nll_sums: torch.Tensor  # (B,) −Σ log p over each pair's SFT-scored chosen tokens
    nll_counts: torch.Tensor  # (B,) how many tokens that is

    @property
    def nll_sum(self) -> torch.Tensor:  # () over the batch
        return self.nll_sums.sum()

    @property
    def nll_count(self) -> torch.Tensor:  # ()
        return self.nll_counts.sum()


class ScoreSpec(NamedTuple):
    """Which hidden states score which tokens — independent of how the pairs were laid out.

    Sequences: chosen of pair i is i, rejected of pair i is B + i. The token of a sequence at
    position t is predicted by the hidden state at t − 1; `index` points at that state in the
    flattened (R·L) hidden states, whatever row and offset the layout gave it.
    """

    index: torch.Tensor  # (N,) long: flat (R·L) index of the predicting hidden state
    target: torch.Tensor  # (N,) long: the scored token
    seq: torch.Tensor  # (N,) long: which of the 2B sequences it belongs to
    response: torch.Tensor  # (N,) bool: counts toward ℓ (a response token)
    sft: torch.Tensor  # (N,) bool: counts toward the NLL (chosen; + prompt with sft_on_prompt)
    num_pairs: int  # B


def score_logps(
    hidden: torch.Tensor,
    spec: ScoreSpec,
    head: OutputHead,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PairLogps:
    """Final hidden states (R, L, H) of any layout + its ScoreSpec → PairLogps.

    Only the N scored positions are gathered and projected, chunk by chunk. A state may be
    gathered twice (a shared prompt's last token predicts both first response tokens); the
    indexing's backward sums the two gradients.
    """
    b = spec.num_pairs
    h = hidden.reshape(-1, hidden.shape[-1])[spec.index]  # (N, H)
    logp = chunked_token_logps(h, head, spec.target, chunk_size)  # (N,) fp32
    zeros = torch.zeros(2 * b, dtype=torch.float32, device=hidden.device)
    sums = zeros.index_add(0, spec.seq, torch.where(spec.response, logp, 0.0))  # (2B,)
    nll = zeros.index_add(0, spec.seq, torch.where(spec.sft, -logp, 0.0))  # (2B,)
    counts = torch.bincount(spec.seq[spec.response], minlength=2 * b)  # (2B,)
    sft_counts = torch.bincount(spec.seq[spec.sft], minlength=2 * b)  # (2B,)
    return PairLogps(
        chosen_sum=sums[:b], chosen_count=counts[:b],
        rejected_sum=sums[b:], rejected_count=counts[b:],
        nll_sums=nll[:b], nll_counts=sft_counts[:b],
    )


def padded_spec(input_ids: torch.Tensor, response_mask: torch.Tensor,
                attention_mask: torch.Tensor | None = None, *,
                sft_on_prompt: bool = False) -> ScoreSpec:
    """The ScoreSpec of a padded `(2B, T)` batch: rows [0:B] chosen, [B:2B] rejected."""
    rows, length = input_ids.shape
    if rows % 2:
        raise ValueError(f"expected chosen and rejected rows stacked (2B, T), got {rows} rows")
    b = rows // 2
    resp = response_mask[:, 1:].bool()  # (2B, T-1): is token t+1 a response token
    sft = resp.clone()
    sft[b:] = False
    if sft_on_prompt:
        if attention_mask is None:
            raise ValueError("sft_on_prompt needs the attention_mask")
        sft[:b] = attention_mask[:b, 1:].bool()
    scored = resp | sft  # (2B, T-1)
    row, col = scored.nonzero(as_tuple=True)  # row-major: chosen rows, then rejected
    return ScoreSpec(index=row * length + col, target=input_ids[row, col + 1], seq=row,
                     response=resp[row, col], sft=sft[row, col], num_pairs=b)


def pair_logps(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    head: OutputHead,
    *,
    attention_mask: torch.Tensor | None = None,
    sft_on_prompt: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PairLogps:
    """Score a padded `(2B, T)` batch (rows [0:B] chosen, [B:2B] rejected) from its final
    hidden states. Only scored positions are gathered and projected: the response tokens of
    every row, plus (with `sft_on_prompt`) the chosen prompt tokens."""
    spec = padded_spec(input_ids, response_mask, attention_mask, sft_on_prompt=sft_on_prompt)
    return score_logps(hidden, spec, head, chunk_size)


class ORPOOutput(NamedTuple):
    loss: torch.Tensor  # () what to backpropagate
    nll: torch.Tensor  # () SFT term as added to the loss
    ratio_loss: torch.Tensor  # () mean L_OR of this batch
    log_odds: torch.Tensor  # (B,) log odds ratio per pair
    chosen_logps: torch.Tensor  # (B,) ℓw, mean response log-prob
    rejected_logps: torch.Tensor  # (B,) ℓl
    chosen_rewards: torch.Tensor  # (B,) β ℓw
    rejected_rewards: torch.Tensor  # (B,) β ℓl
    reward_accuracy: torch.Tensor  # () mean(ℓw > ℓl)
    reward_margin: torch.Tensor  # () mean(β (ℓw − ℓl))


def odds_ratio_terms(chosen_logps: torch.Tensor,
                     rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log odds ratio, L_OR) per pair from mean response log-probs, in fp32."""
    lw = chosen_logps.float().clamp(max=LOGP_CEIL)
    ll = rejected_logps.float().clamp(max=LOGP_CEIL)
    log_odds = (lw - ll) - (log1mexp(lw) - log1mexp(ll))
    return log_odds, -F.logsigmoid(log_odds)


def orpo_loss(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    num_pairs: int | torch.Tensor | None = None,
    num_nll_tokens: int | torch.Tensor | None = None,
) -> ORPOOutput:
    """ORPO loss from log-prob statistics (see the module docstring for the conventions)."""
    counts = torch.cat([logps.chosen_count, logps.rejected_count])
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"pair rows {empty} (chosen first, then rejected) have no response "
                         "tokens; the data pipeline must drop such pairs before the loss")
    lw = logps.chosen_sum / logps.chosen_count  # (B,)
    ll = logps.rejected_sum / logps.rejected_count
    log_odds, l_or = odds_ratio_terms(lw, ll)
    pairs = lw.shape[0] if num_pairs is None else num_pairs
    nll_tokens = logps.nll_count.clamp(min=1) if num_nll_tokens is None else num_nll_tokens
    nll = logps.nll_sum / nll_tokens
    loss = nll + beta * l_or.sum() / pairs
    with torch.no_grad():
        cw, cl = beta * lw.detach(), beta * ll.detach()
        return ORPOOutput(
            loss=loss, nll=nll, ratio_loss=l_or.mean(), log_odds=log_odds, chosen_logps=lw,
            rejected_logps=ll, chosen_rewards=cw, rejected_rewards=cl,
            reward_accuracy=(lw > ll).float().mean(), reward_margin=(cw - cl).mean(),
        )

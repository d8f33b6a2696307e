"""The chunked ORPO loss against naive full-logits references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qorpo.loss import (
    OutputHead,
    PairLogps,
    chunked_token_logps,
    log1mexp,
    odds_ratio_terms,
    orpo_loss,
    pair_logps,
)

# ----------------------------------------------------------------------------- references


def naive_logits(hidden, weight, bias=None, scale=1.0, softcap=None):
    z = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def naive_token_logps(hidden, weight, targets, bias=None, scale=1.0, softcap=None):
    z = naive_logits(hidden, weight, bias, scale, softcap)
    return z.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def naive_orpo(logits, input_ids, response_mask, attention_mask, beta, sft_on_prompt=False):
    """TRL-style: full (2B, T, V) logits → log_softmax → gather → masked means."""
    b = input_ids.shape[0] // 2
    logp = logits[:, :-1].log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    resp = response_mask[:, 1:].float()
    mean = (logp * resp).sum(1) / resp.sum(1)
    lw, ll = mean[:b], mean[b:]
    log_odds = (lw - ll) - (torch.log1p(-torch.exp(lw)) - torch.log1p(-torch.exp(ll)))
    ratio = -F.logsigmoid(log_odds)
    sft = attention_mask[:b, 1:].float() if sft_on_prompt else resp[:b]
    nll = -(logp[:b] * sft).sum() / sft.sum()
    return nll + beta * ratio.mean(), log_odds, lw, ll


def random_pair_batch(b, t, vocab, hidden, gen, dtype=torch.float32):
    """Random right-padded (2B, T) batch with random prompt/response boundaries."""
    ids = torch.randint(0, vocab, (2 * b, t), generator=gen)
    attn = torch.zeros(2 * b, t, dtype=torch.long)
    resp = torch.zeros(2 * b, t, dtype=torch.long)
    for r in range(2 * b):
        length = int(torch.randint(3, t + 1, (1,), generator=gen))
        start = int(torch.randint(1, length, (1,), generator=gen))
        attn[r, :length] = 1
        resp[r, start:length] = 1
    h = torch.randn(2 * b, t, hidden, generator=gen, dtype=torch.float32).to(dtype)
    return ids, attn, resp, h


# ----------------------------------------------------------------------------- log1mexp


def test_log1mexp_matches_float64_reference_everywhere():
    x = -torch.logspace(-8, 2, 2000, dtype=torch.float64)
    ref = torch.log(-torch.expm1(x))  # exact in float64 over this range
    got = log1mexp(x.float()).double()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_log1mexp_near_zero_is_finite_where_naive_is_not():
    x = torch.tensor([-1e-8], requires_grad=True)
    naive = torch.log1p(-torch.exp(x.detach()))
    assert torch.isinf(naive).all()  # the failure mode that NaN'd peers' runs
    y = log1mexp(x)
    assert torch.isfinite(y).all()
    assert y.item() == pytest.approx(math.log(1e-8), rel=1e-6)
    y.backward()
    assert torch.isfinite(x.grad).all()


def test_log1mexp_gradient_finite_on_both_branches():
    x = torch.tensor([-1e-7, -0.5, -math.log(2.0), -0.9, -30.0], requires_grad=True)
    log1mexp(x).sum().backward()
    expected = -torch.exp(x.detach()) / (-torch.expm1(x.detach()))  # d/dx log(1-e^x)
    assert torch.allclose(x.grad, expected, rtol=1e-4)


# ----------------------------------------------------------------------------- golden values


def test_golden_log_odds_and_ratio_loss():
    log_odds, l_or = odds_ratio_terms(torch.tensor([-0.5]), torch.tensor([-1.0]))
    assert log_odds.item() == pytest.approx(0.9740770, abs=1e-6)
    assert l_or.item() == pytest.approx(0.3202998, abs=1e-6)


def test_certain_chosen_does_not_nan():
    lw = torch.tensor([0.0, -1e-9], requires_grad=True)
    log_odds, l_or = odds_ratio_terms(lw, torch.tensor([-2.0, -2.0]))
    l_or.sum().backward()
    assert torch.isfinite(log_odds).all() and torch.isfinite(lw.grad).all()


# ----------------------------------------------------------------------------- chunked log-probs

SHAPES = [(1, 31), (3, 31), (47, 1000), (123, 1000), (123, 31)]
HEADS = [(1.0, None), (0.0625, None), (1.0, 30.0), (1.7, 5.0)]  # (scale, softcap)


@pytest.mark.parametrize("n,vocab", SHAPES)
@pytest.mark.parametrize("chunk", [1, 16, 41, 4096])
@pytest.mark.parametrize("scale,softcap", HEADS)
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_logps_match_naive_fp32(n, vocab, chunk, scale, softcap, train_head):
    gen = torch.Generator().manual_seed(n * 7 + vocab + chunk)
    hdim = 24
    h = torch.randn(n, hdim, generator=gen, requires_grad=True)
    w = (torch.randn(vocab, hdim, generator=gen) * 0.5).requires_grad_(train_head)
    bias = (torch.randn(vocab, generator=gen) * 0.1).requires_grad_(train_head)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)  # a random downstream loss

    got = chunked_token_logps(h, OutputHead(w, bias, scale, softcap), targets, chunk)
    (got * upstream).sum().backward()
    g_h, g_w, g_b = h.grad.clone(), (w.grad.clone() if train_head else None), bias.grad
    h.grad = None
    if train_head:
        w.grad, bias.grad = None, None

    ref = naive_token_logps(h, w, targets, bias, scale, softcap)
    (ref * upstream).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_h, h.grad, atol=1e-5, rtol=1e-5)
    if train_head:
        torch.testing.assert_close(g_w, w.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_b, bias.grad, atol=1e-5, rtol=1e-5)
    else:
        assert w.grad is None and g_b is None  # frozen head: no weight gradient computed


@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_logps_bf16_tolerance(train_head):
    """bf16 inputs: log-probs within 2e-2 and grads within 2e-2 (relative to the fp32 result on
    the same bf16-rounded inputs) — the bf16 matmul has 8 mantissa bits."""
    gen = torch.Generator().manual_seed(3)
    n, vocab, hdim = 47, 1000, 32
    h32 = torch.randn(n, hdim, generator=gen)
    w32 = torch.randn(vocab, hdim, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    h = h32.bfloat16().requires_grad_()
    w = w32.bfloat16().requires_grad_(train_head)
    got = chunked_token_logps(h, OutputHead(w), targets, 16)
    (got * upstream).sum().backward()
    hr = h32.bfloat16().float().requires_grad_()
    wr = w32.bfloat16().float().requires_grad_(train_head)
    ref = naive_token_logps(hr, wr, targets)
    (ref * upstream).sum().backward()
    assert got.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h.grad.float(), hr.grad, atol=2e-2, rtol=2e-2)
    if train_head:
        torch.testing.assert_close(w.grad.float(), wr.grad, atol=2e-2, rtol=2e-2)


def test_chunked_logps_bad_shapes():
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_token_logps(torch.randn(2, 3, 4), OutputHead(torch.randn(5, 4)),
                            torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(torch.randn(2, 4), OutputHead(torch.randn(5, 4)),
                            torch.zeros(2, dtype=torch.long), 0)


def test_chunked_logps_never_build_more_than_a_chunk(monkeypatch):
    """Peak extra memory O(chunk × V): no logits tensor larger than chunk × V is ever made."""
    import qorpo.loss as L

    seen = []
    real = L._chunk_logits

    def spy(h, head):
        z = real(h, head)
        seen.append(z.shape[0])
        return z

    monkeypatch.setattr(L, "_chunk_logits", spy)
    h = torch.randn(100, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    out = chunked_token_logps(h, OutputHead(w), torch.randint(0, 50, (100,)), 32)
    out.sum().backward()
    assert max(seen) <= 32 and sum(seen) == 200  # forward + recompute in backward


# ----------------------------------------------------------------------------- the whole loss


@pytest.mark.parametrize("sft_on_prompt", [False, True])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.5, 10.0)])
@pytest.mark.parametrize("b,t", [(1, 5), (3, 17), (4, 33)])
def test_orpo_loss_matches_full_logits_reference(sft_on_prompt, scale, softcap, b, t):
    gen = torch.Generator().manual_seed(b * 100 + t)
    vocab, hdim, beta = 97, 16, 0.1
    ids, attn, resp, h = random_pair_batch(b, t, vocab, hdim, gen)
    h.requires_grad_()
    w = torch.randn(vocab, hdim, generator=gen) * 0.4

    out = orpo_loss(pair_logps(h, ids, resp, OutputHead(w, None, scale, softcap),
                               attention_mask=attn, sft_on_prompt=sft_on_prompt, chunk_size=7),
                    beta=beta)
    out.loss.backward()
    g = h.grad.clone()
    h.grad = None

    ref_loss, ref_odds, ref_lw, ref_ll = naive_orpo(
        naive_logits(h, w, None, scale, softcap), ids, resp, attn, beta, sft_on_prompt)
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_odds, ref_odds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.chosen_logps, ref_lw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rejected_logps, ref_ll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, h.grad, atol=1e-5, rtol=1e-5)
    assert out.reward_accuracy.item() == pytest.approx((ref_lw > ref_ll).float().mean().item())
    assert out.reward_margin.item() == pytest.approx((beta * (ref_lw - ref_ll)).mean().item(),
                                                     abs=1e-6)
    # padding is never scored: ids under attention_mask == 0 cannot change anything
    ids2 = torch.where(attn.bool(), ids, (ids + 1) % vocab)
    out2 = orpo_loss(pair_logps(h.detach(), ids2, resp, OutputHead(w, None, scale, softcap),
                                attention_mask=attn, sft_on_prompt=sft_on_prompt), beta=beta)
    assert out2.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)


def test_prompt_tokens_never_projected_without_sft_on_prompt(monkeypatch):
    import qorpo.loss as L

    rows = []
    real = L._chunk_logits
    monkeypatch.setattr(L, "_chunk_logits", lambda h, head: rows.append(len(h)) or real(h, head))
    gen = torch.Generator().manual_seed(0)
    ids, attn, resp, h = random_pair_batch(3, 12, 50, 8, gen)
    pair_logps(h, ids, resp, OutputHead(torch.randn(50, 8)), chunk_size=10**6)
    assert rows == [int(resp[:, 1:].sum())]


def test_zero_response_tokens_is_an_error():
    logps = PairLogps(torch.tensor([-3.0]), torch.tensor([0]), torch.tensor([-4.0]),
                      torch.tensor([2]), torch.tensor(1.0), torch.tensor(1))
    with pytest.raises(ValueError, match="no response tokens"):
        orpo_loss(logps)


def test_gradient_accumulation_equivalence():
    """2 micro-batches of 1 pair, normalised by window totals == 1 batch of 2 pairs."""
    gen = torch.Generator().manual_seed(11)
    vocab, hdim, beta = 61, 12, 0.25
    ids, attn, resp, h = random_pair_batch(2, 9, vocab, hdim, gen)
    w = (torch.randn(vocab, hdim, generator=gen) * 0.5).requires_grad_()
    head = OutputHead(w)

    def logps_of(rows, hidden):
        return pair_logps(hidden, ids[rows], resp[rows], head, attention_mask=attn[rows])

    hb = h.clone().requires_grad_()
    orpo_loss(logps_of([0, 1, 2, 3], hb), beta=beta).loss.backward()
    big_h, big_w = hb.grad.clone(), w.grad.clone()
    w.grad = None

    hs = h.clone().requires_grad_()
    tokens = int(resp[:2, 1:].sum())  # scored chosen tokens over the window
    for pair in (0, 1):
        rows = [pair, pair + 2]  # (chosen, rejected) of one pair
        out = orpo_loss(logps_of(rows, hs[rows]), beta=beta, num_pairs=2, num_nll_tokens=tokens)
        out.loss.backward()
    torch.testing.assert_close(hs.grad, big_h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w.grad, big_w, atol=1e-6, rtol=1e-6)
    # and the naive per-micro-batch mean would NOT match (the check can fail)
    assert resp[0, 1:].sum() != resp[1, 1:].sum()

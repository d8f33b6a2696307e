"""Sequence layouts (qorpo.data.collate, qorpo.attention, qorpo.forward): padded, shared-prompt
and packed batches must give the same ℓw, ℓl, NLL, ORPO loss and LoRA gradients as a naive
reference on separate unpadded rows."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qorpo.attention import PAIR_ATTENTION as PAIRS
from qorpo.attention.flex import flex_block_mask, flex_mask_mod
from qorpo.attention.masks import additive_mask, model_attention_mask
from qorpo.attention.pairs import pair_attention, pair_spans, use_pair_attention
from qorpo.data.collate import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    Batch,
    build_batch,
    pairs_from_features,
)
from qorpo.forward import hidden_states, supports_layout
from qorpo.loss import orpo_loss, pair_logps, score_logps
from qorpo.model import final_hidden_states, output_head
from qorpo.quant import keep_4bit_differentiable

VOCAB = 320


@pytest.fixture(autouse=True)
def _pair_attention_on_short_rows(monkeypatch):
    """The test pairs are short: let qorpo.attention.pairs' kernels take them anyway."""
    monkeypatch.setattr("qorpo.attention.cost.MIN_ROW_LENGTH", 0)
TOL = {"atol": 1e-5, "rtol": 1e-5}
LAYOUTS = ("padded", "shared", "packed")


# ----------------------------------------------------------------------------- fixtures
def random_pairs(seed: int, n: int = 6) -> list[tuple[list[int], list[int], list[int]]]:
    """Odd lengths, a one-token prompt, a long prompt, one-token responses on both sides."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    shapes = [(1, 5, 3), (41, 1, 4), (3, 7, 1), (1, 1, 1), (9, 4, 6), (5, 3, 9)][:n]
    return [(ids(p), ids(c), ids(r)) for p, c, r in shapes]


@cache
def _saved_model(arch: str) -> Path:
    import tempfile

    from tests.tiny import make_model

    return make_model(Path(tempfile.mkdtemp(prefix=f"qorpo-layout-{arch}-")), arch=arch,
                      vocab_size=VOCAB, layers=2)


def _randomize_lora(model: nn.Module, seed: int = 0) -> None:
    # peft starts B at zero, which would make every A gradient zero: nothing to compare.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def lora_model(arch: str, attn: str, *, quant: bool = False, ckpt: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"attn_implementation": "sdpa" if attn == PAIRS else attn,
                    "dtype": torch.float32}
    if quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(_saved_model(arch)), **kwargs)
    if attn == PAIRS:
        assert use_pair_attention(model)
    keep_4bit_differentiable(model)
    return with_random_lora(model, ckpt=ckpt)


def with_random_lora(model: nn.Module, *, ckpt: bool = False) -> nn.Module:
    """LoRA on every linear layer with random weights (both A and B), in train mode;
    `ckpt`: non-reentrant gradient checkpointing first."""
    from peft import LoraConfig, get_peft_model

    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    _randomize_lora(model)
    model.train()
    return model


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def run_layout(model: nn.Module, pairs, layout: str, sft_on_prompt: bool, **kw):
    model.zero_grad(set_to_none=True)
    batch = build_batch(pairs, layout, pad_token_id=2, sft_on_prompt=sft_on_prompt,
                        max_row_tokens=kw.pop("max_row_tokens", 48), **kw)
    hidden = hidden_states(model, batch)  # (R, L, H)
    logps = score_logps(hidden, batch.spec, output_head(model), chunk_size=7)
    out = orpo_loss(logps, beta=0.1)
    out.loss.backward()
    return batch, logps, out, lora_grads(model)


def naive_reference(model: nn.Module, pairs, sft_on_prompt: bool):
    """One unpadded row per sequence, no mask, full logits: the textbook computation."""
    model.zero_grad(set_to_none=True)
    lw, ll, cw, cl, nll_terms = [], [], [], [], []
    for p, c, r in pairs:
        for side, resp in (("chosen", c), ("rejected", r)):
            ids = torch.tensor([p + resp])
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # (T, V)
            logp = logits[:-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)  # (T-1,)
            resp_logp = logp[len(p) - 1:]  # tokens P..T-1
            if side == "chosen":
                lw.append(resp_logp.sum())
                cw.append(len(resp))
                nll_terms.append(logp if sft_on_prompt else resp_logp)
            else:
                ll.append(resp_logp.sum())
                cl.append(len(resp))
    chosen_sum, rejected_sum = torch.stack(lw), torch.stack(ll)
    mw = chosen_sum / torch.tensor(cw)
    ml = rejected_sum / torch.tensor(cl)
    log_odds = (mw - ml) - (torch.log1p(-torch.exp(mw)) - torch.log1p(-torch.exp(ml)))
    nll_all = torch.cat(nll_terms)
    nll = -nll_all.sum() / nll_all.numel()
    loss = nll + 0.1 * (-F.logsigmoid(log_odds)).mean()
    loss.backward()
    return {"chosen_sum": chosen_sum.detach(), "rejected_sum": rejected_sum.detach(),
            "chosen_count": torch.tensor(cw), "rejected_count": torch.tensor(cl),
            "nll_sum": -nll_all.sum().detach(), "nll_count": nll_all.numel(),
            "loss": loss.detach(), "grads": lora_grads(model)}


def assert_same(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def assert_all_equal(results: dict, ref: dict) -> None:
    for layout, (_, logps, out, grads) in results.items():
        for field in ("chosen_sum", "rejected_sum", "nll_sum"):
            assert_same(getattr(logps, field), ref[field], f"{layout} {field}")
        for field in ("chosen_count", "rejected_count"):
            assert torch.equal(getattr(logps, field), ref[field]), f"{layout} {field}"
        assert int(logps.nll_count) == ref["nll_count"]
        assert_same(out.loss.detach(), ref["loss"], f"{layout} loss")
        assert grads.keys() == ref["grads"].keys() and len(grads) > 0
        for name, g in grads.items():
            assert_same(g, ref["grads"][name], f"{layout} grad {name}")


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", PAIRS])
@pytest.mark.parametrize("sft_on_prompt", [False, True])
def test_layouts_match_naive_reference(arch, attn, sft_on_prompt):
    torch.manual_seed(0)
    model = lora_model(arch, attn)
    pairs = random_pairs(seed=sum(map(ord, arch + attn)) + sft_on_prompt)
    ref = naive_reference(model, pairs, sft_on_prompt)
    results = {lay: run_layout(model, pairs, lay, sft_on_prompt) for lay in LAYOUTS}
    assert_all_equal(results, ref)
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())  # every LoRA layer is reached
    packed, shared = results["packed"][0], results["shared"][0]
    assert packed.input_ids.shape[0] < shared.input_ids.shape[0]  # pairs really share rows
    assert packed.unique_tokens == shared.unique_tokens == results["padded"][0].unique_tokens


@pytest.mark.parametrize("attn", ["sdpa", PAIRS])
def test_gradient_checkpointing_non_reentrant(attn):
    model = lora_model("llama", attn, ckpt=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    pairs = random_pairs(seed=5)
    ref = naive_reference(model, pairs, sft_on_prompt=True)
    results = {lay: run_layout(model, pairs, lay, True) for lay in LAYOUTS}
    assert_all_equal(results, ref)


@pytest.mark.parametrize("attn", ["sdpa", PAIRS])
def test_4bit_base_with_lora(attn):
    pytest.importorskip("bitsandbytes")
    model = lora_model("llama", attn, quant=True)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # the probe runs an eval-mode no-grad pass: after it, the LoRA gradients must still flow
    assert supports_layout(model, "packed").ok
    pairs = random_pairs(seed=9)
    ref = naive_reference(model, pairs, sft_on_prompt=False)
    results = {lay: run_layout(model, pairs, lay, False) for lay in LAYOUTS}
    assert_all_equal(results, ref)
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())


def test_pair_attention_gets_the_spans_through_checkpointing(monkeypatch):
    """The spans reach the attention function in the forward and in the backward's
    recomputation (else it would silently fall back to the masked kernel)."""
    from transformers import AttentionInterface

    calls = {"spans": 0, "none": 0}

    def spy(*args, **kwargs):
        calls["spans" if kwargs.get("qorpo_spans") is not None else "none"] += 1
        return pair_attention(*args, **kwargs)

    model = lora_model("llama", PAIRS, ckpt=True)
    monkeypatch.setitem(AttentionInterface._global_mapping, PAIRS, spy)
    run_layout(model, random_pairs(seed=3), "packed", False)
    assert calls == {"spans": 2 * 2, "none": 0}  # 2 layers: forward + recomputation
    run_layout(model, random_pairs(seed=3), "padded", False)
    assert calls["none"] == 2 * 2  # padded rows: plain sdpa with the model's own mask


def test_pair_spans_describe_the_layout():
    pairs = random_pairs(seed=11, n=7)
    for layout in ("shared", "packed"):
        batch = build_batch(pairs, layout, max_row_tokens=60, pad_to_multiple_of=8)
        spans = pair_spans(batch)
        assert sorted((s.prompt, s.chosen, s.rejected) for s in spans) == sorted(
            (len(p), len(c), len(r)) for p, c, r in pairs)
        for s in spans:
            parts = batch.part[s.row, s.start:s.start + s.prompt + s.chosen + s.rejected]
            want = [0] * s.prompt + [1] * s.chosen + [2] * s.rejected  # PROMPT, CHOSEN, REJECTED
            assert parts.tolist() == want


def padded_rows(features: list[dict], pad: int, multiple: int) -> dict[str, torch.Tensor]:
    """The (2B, T) rows every peer builds, written out here independently of qorpo: chosen
    rows then rejected rows, right-padded to a multiple, masks from positions."""
    seqs = [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in features]
    starts = [f[f"{side}_response_start"] for side in ("chosen", "rejected") for f in features]
    t = -(-max(map(len, seqs)) // multiple) * multiple
    out = {k: torch.zeros(len(seqs), t, dtype=torch.long)
           for k in ("input_ids", "attention_mask", "response_mask")}
    out["input_ids"].fill_(pad)
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        out["input_ids"][i, :len(seq)] = torch.tensor(seq)
        out["attention_mask"][i, :len(seq)] = 1
        out["response_mask"][i, start:len(seq)] = 1
    return out


def test_padded_spec_is_bitwise_pair_logps():
    """The padded layout's spec IS the (2B, T) rows' pair_logps, bit for bit."""
    model = lora_model("qwen2", "sdpa")
    pairs = random_pairs(seed=3)
    features = [{"row": k, "chosen_input_ids": p + c, "rejected_input_ids": p + r,
                 "chosen_response_start": len(p), "rejected_response_start": len(p)}
                for k, (p, c, r) in enumerate(pairs)]
    assert pairs_from_features(features) == pairs
    old = padded_rows(features, pad=2, multiple=8)
    for sft in (False, True):
        new = build_batch(pairs, "padded", pad_token_id=2, sft_on_prompt=sft,
                          pad_to_multiple_of=8)
        assert torch.equal(new.input_ids, old["input_ids"])
        assert torch.equal(new.attention_mask(), old["attention_mask"])
        with torch.no_grad():
            hidden = final_hidden_states(model, old["input_ids"], old["attention_mask"])
            head = output_head(model)
            a = pair_logps(hidden, old["input_ids"], old["response_mask"], head,
                           attention_mask=old["attention_mask"], sft_on_prompt=sft, chunk_size=5)
            b = score_logps(hidden, new.spec, head, chunk_size=5)
        for field in a._fields:
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert new.num_sft_tokens == int(
            (old["attention_mask"] if sft else old["response_mask"])[:len(pairs), 1:].sum())


# ----------------------------------------------------------------------------- the boundary
def test_first_rejected_token_is_predicted_by_last_prompt_token():
    pairs = [([11, 12, 13], [21, 22], [31, 32, 33]), ([14], [23, 24, 25], [34])]
    for layout in ("shared", "packed"):
        b = build_batch(pairs, layout, max_row_tokens=100)
        flat_ids, flat_part = b.input_ids.flatten(), b.part.flatten()
        for i, (p, c, r) in enumerate(pairs):
            rej = (b.score_seq == len(pairs) + i).nonzero().flatten()
            first = int(b.score_index[rej[0]])
            assert int(b.score_target[rej[0]]) == r[0]
            assert flat_part[first] == PROMPT and int(flat_ids[first]) == p[-1]
            # the row position right before the rejected response holds the last CHOSEN
            # token: predicting from it would be the bug this test exists for
            row_pos = (flat_ids == r[0]).nonzero().flatten()[0]
            assert flat_part[row_pos - 1] == CHOSEN and int(flat_ids[row_pos - 1]) == c[-1]
            # later rejected tokens: from the previous rejected token
            for k in rej[1:]:
                assert flat_part[int(b.score_index[k])] == REJECTED
            # and positions: rejected continues the prompt, not the chosen response
            pos = b.position_ids.flatten()
            assert int(pos[row_pos]) == len(p) and int(pos[first]) == len(p) - 1


def test_rejected_never_sees_chosen():
    """Changing the chosen response changes ℓw, not ℓl (shared and packed)."""
    model = lora_model("llama", "sdpa")
    model.eval()
    pairs = random_pairs(seed=1)
    other = [(p, [(t * 7 + 1) % VOCAB for t in c], r) for p, c, r in pairs]
    head = output_head(model)
    for layout in ("shared", "packed"):
        with torch.no_grad():
            got = []
            for ps in (pairs, other):
                b = build_batch(ps, layout, max_row_tokens=48)
                got.append(score_logps(hidden_states(model, b), b.spec, head))
        torch.testing.assert_close(got[0].rejected_sum, got[1].rejected_sum, atol=1e-6, rtol=0)
        assert not torch.allclose(got[0].chosen_sum, got[1].chosen_sum)


def test_dense_mask_structure_and_flex_rule():
    pairs = random_pairs(seed=4)
    b = build_batch(pairs, "packed", max_row_tokens=60, pad_to_multiple_of=8)
    mask = b.dense_mask()  # (R, 1, L, L)
    rows, length = b.input_ids.shape
    assert mask.shape == (rows, 1, length, length) and mask.dtype == torch.bool
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # no fully masked query row
    assert not mask.triu(1).any()  # causal
    part = b.part
    rej_q = (part == REJECTED)[:, None, :, None]
    cho_kv = (part == CHOSEN)[:, None, None, :]
    assert not (mask & rej_q & cho_kv).any()
    assert b.pad_tokens == int((part == PAD).sum()) and b.pad_tokens < length
    # the FlexAttention mask_mod encodes the same rule
    q = torch.arange(length)[None, None, :, None]
    kv = torch.arange(length)[None, None, None, :]
    bi = torch.arange(rows)[:, None, None, None]
    dense = flex_mask_mod(b.segment_ids, b.part.long())(bi, 0, q, kv)
    assert torch.equal(dense, mask)
    assert flex_block_mask(b).shape[0] == rows
    # eager's additive form: 0 where allowed, a large negative elsewhere
    add = additive_mask(mask, torch.bfloat16)
    assert add.dtype == torch.bfloat16 and (add == 0).eq(mask).all()


def test_packing_capacity_and_counts():
    pairs = random_pairs(seed=2)
    lens = [len(p) + len(c) + len(r) for p, c, r in pairs]
    b = build_batch(pairs, "packed", max_row_tokens=50)
    assert b.input_ids.shape[1] <= 50 and b.input_ids.shape[0] < len(pairs)
    assert b.pad_tokens + sum(lens) == b.input_ids.numel()
    assert b.unique_tokens == sum(lens) == b.input_tokens
    padded = build_batch(pairs, "padded")
    assert padded.input_tokens == sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    assert padded.input_ids.shape[0] == 2 * len(pairs)
    with pytest.raises(ValueError, match="max_row_tokens"):
        build_batch(pairs, "packed", max_row_tokens=max(lens) - 1)
    with pytest.raises(ValueError, match="at least one token"):
        build_batch([([], [1], [2])], "shared")
    moved = Batch.from_dict(b.to_dict()).to("cpu")
    assert torch.equal(moved.score_index, b.score_index)


# ----------------------------------------------------------------------------- support checks
def _tiny(config_cls, attn: str = "sdpa", **over) -> nn.Module:
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    common.update(over)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**common), attn_implementation=attn)


def test_supported_architectures_pass_the_probe():
    from transformers import (
        Gemma2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    cases = [(LlamaConfig, "sdpa", {}), (Qwen2Config, "eager", {}), (Qwen3Config, "sdpa", {}),
             (Phi3Config, "sdpa", {"pad_token_id": 0}),
             (MistralConfig, "sdpa", {"sliding_window": None}),
             (Gemma2Config, "eager", {"head_dim": 16})]  # gemma2: no sdpa (attn softcap)
    for cls, attn, over in cases:
        model = _tiny(cls, attn, **over)
        for layout in ("shared", "packed"):
            got = supports_layout(model, layout, max_seq_len=64)
            assert got.ok, (cls.__name__, got.reason)
            assert "probe matches" in got.reason


def test_unsupported_attention_implementation_is_reported():
    from transformers import LlamaConfig

    model = _tiny(LlamaConfig)
    model.config._attn_implementation = "flash_attention_2"  # only the name is checked
    got = supports_layout(model, "shared")
    assert not got.ok and "flash_attention_2" in got.reason
    with pytest.raises(ValueError, match="sdpa, eager or flex_attention"):
        model_attention_mask(model, build_batch(random_pairs(0, 2), "shared"))


class _DropsMask(nn.Module):
    """A model that silently ignores custom masks (or position ids): the probe must notice."""

    def __init__(self, inner: nn.Module, drop: str) -> None:
        super().__init__()
        self.inner, self.drop = inner, drop
        self.config = inner.config

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs):
        kwargs[self.drop] = None
        return self.inner(**kwargs)


@pytest.mark.parametrize("drop", ["attention_mask", "position_ids"])
def test_probe_catches_models_that_ignore_masks_or_positions(drop):
    from transformers import LlamaConfig

    model = _DropsMask(_tiny(LlamaConfig), drop)
    got = supports_layout(model, "shared")
    assert not got.ok and "differ from padded" in got.reason, got.reason


def test_packing_capacity_weighs_padding_against_attention():
    from qorpo.data.placement import choose_capacity, pack_rows

    # 920 + 470 and 768 + 500 fit rows of 1,392: 2 rows instead of 4 rows of 920 (38% padding)
    lengths = [920, 768, 500, 470]
    cap = choose_capacity(lengths, 8, attention_cost=1 / (6 * 576))
    rows = pack_rows(lengths, cap)
    assert len(rows) == 2 and max(sum(lengths[i] for i in r) for r in rows) <= cap
    # attention that costs much more than the linear layers: keep rows short
    assert choose_capacity(lengths, 8, attention_cost=1.0) == 920
    # never longer than twice the longest pair
    assert choose_capacity([100] * 10, 8, attention_cost=0.0) == 200

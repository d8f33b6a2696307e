"""Sliding-window layers and Gemma 2's attention soft-capping in the shared/packed layouts
(qorpo.attention): rows longer than the window, several pairs per packed row, odd lengths.

The reference is transformers' own eager attention on one unpadded row per sequence (its own
sliding-window mask and soft-cap: tests/test_layout.py's naive_reference); the same LoRA model
then runs every layout with the kernel qorpo chooses on the CPU (the per-pair kernel) or with
the dense masks (sdpa, eager): log-probs, ORPO loss and LoRA gradients must agree (1e-5, fp32).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from qorpo.attention import PAIR_ATTENTION
from qorpo.attention.choice import choose
from qorpo.attention.flex import flex_block_mask, flex_mask_mod
from qorpo.attention.masks import (
    attn_implementation,
    layer_windows,
    model_attention_mask,
    windowed_dense_mask,
)
from qorpo.attention.pairs import capped_attention
from qorpo.data.collate import build_batch
from qorpo.forward import evaluating, hidden_states, supports_layout
from tests.test_flex import (
    _tiles,
    eager_flex,  # noqa: F401  (fixture)
)
from tests.test_layout import (
    LAYOUTS,
    VOCAB,
    assert_all_equal,
    naive_reference,
    run_layout,
    with_random_lora,
)

WINDOW = 8
# Every pair's prompt + response is longer than the window, except one tiny pair; chosen and
# rejected of different lengths; packed rows of up to 48 tokens hold 2-3 pairs.
SHAPES = [(5, 9, 4), (11, 3, 7), (2, 13, 10), (1, 1, 1), (7, 6, 12)]


@pytest.fixture(autouse=True)
def _pair_attention_on_short_rows(monkeypatch):
    """The test rows are short: let the per-pair kernel take them anyway."""
    monkeypatch.setattr("qorpo.attention.cost.MIN_ROW_LENGTH", 0)


def long_pairs(seed: int, shapes=SHAPES) -> list[tuple[list[int], list[int], list[int]]]:
    rng = random.Random(seed)
    return [tuple([rng.randrange(3, VOCAB) for _ in range(n)] for n in shape)
            for shape in shapes]


def family_config(family: str, window: int = WINDOW):
    """Tiny configs: Mistral (one window on every layer), Gemma 2 (sliding/full alternating,
    attention logits soft-capped at a value the scores really reach), Gemma 3 (two sliding
    layers per full one, by `layer_types`), Qwen2 (sliding from layer max_window_layers on)."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  sliding_window=window)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "gemma2":
        return Gemma2Config(**common, head_dim=16, attn_logit_softcapping=2.0,
                            query_pre_attn_scalar=16)
    if family == "gemma3":
        common["num_hidden_layers"] = 3
        return Gemma3TextConfig(**common, head_dim=16, layer_types=[
            "sliding_attention", "sliding_attention", "full_attention"])
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    raise ValueError(family)


def family_model(family: str, attn: str = "eager", ckpt: bool = False) -> nn.Module:
    """A tiny random model of `family` with random LoRA weights (peft), fp32, train mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family), attn_implementation=attn,
                                             dtype=torch.float32)
    with torch.no_grad():  # as tests/tiny.py: logits not all near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return with_random_lora(model, ckpt=ckpt)


def switch(model: nn.Module, kernel: str) -> None:
    """`kernel`: "chosen" (what qorpo picks on the CPU for the packed layout), or the name of
    a transformers implementation (sdpa, eager, flex_attention)."""
    if kernel == "chosen":
        try:  # as loaded by default: sdpa, or eager where transformers has no sdpa (Gemma 2)
            model.base_model.model.set_attn_implementation("sdpa")
        except ValueError:
            assert model.config.model_type == "gemma2"
        choice = choose(model, "cpu", "packed", None)
        assert choice == (PAIR_ATTENTION, None, False), choice
    else:
        model.base_model.model.set_attn_implementation(kernel)
    assert attn_implementation(model) == (PAIR_ATTENTION if kernel == "chosen" else kernel)


# ----------------------------------------------------------------------------- equivalence
CASES = [("mistral", "chosen"), ("mistral", "eager"), ("gemma2", "chosen"), ("gemma2", "eager"),
         ("gemma3", "chosen"), ("gemma3", "sdpa"), ("qwen2", "chosen"), ("qwen2", "eager")]


@pytest.mark.parametrize(("family", "kernel"), CASES)
def test_layouts_match_transformers_own_sliding_window(family, kernel):
    model = family_model(family)  # the reference: transformers' eager attention, no mask
    pairs = long_pairs(seed=len(family) + len(kernel))
    ref = naive_reference(model, pairs, sft_on_prompt=True)
    switch(model, kernel)
    results = {lay: run_layout(model, pairs, lay, True) for lay in LAYOUTS}
    assert_all_equal(results, ref)
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())
    packed = results["packed"][0]
    assert packed.input_ids.shape[0] < len(pairs)  # pairs really share rows
    # and the window really binds: some query of the batch sees fewer keys with it
    assert not torch.equal(windowed_dense_mask(packed, WINDOW), packed.dense_mask())


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_rows_below_the_threshold_take_whole_rows_with_the_windowed_masks(family, monkeypatch):
    """Rows shorter than MIN_ROW_LENGTH: the per-pair kernel attends over whole rows with the
    batch's windowed masks (per layer type), soft-capped for Gemma 2 (`whole_rows_capped`)."""
    monkeypatch.setattr("qorpo.attention.cost.MIN_ROW_LENGTH", 10_000)
    model = family_model(family)
    pairs = long_pairs(seed=11)
    ref = naive_reference(model, pairs, sft_on_prompt=False)
    switch(model, "chosen")
    results = {lay: run_layout(model, pairs, lay, False) for lay in LAYOUTS}
    assert_all_equal(results, ref)


def test_gradient_checkpointing_with_windows_and_softcap():
    model = family_model("gemma2", ckpt=True)
    pairs = long_pairs(seed=7)
    ref = naive_reference(model, pairs, sft_on_prompt=False)
    switch(model, "chosen")
    results = {lay: run_layout(model, pairs, lay, False) for lay in LAYOUTS}
    assert_all_equal(results, ref)


def test_window_and_softcap_change_the_result():
    """Guards on the tests above: the data reaches past the window, and the cap binds, so
    equality there is not vacuous (a kernel that ignored either would differ)."""
    model = family_model("gemma2", "eager")
    switch(model, "chosen")
    batch = build_batch(long_pairs(seed=1), "packed", pad_token_id=0, max_row_tokens=48)
    with evaluating(model):
        h = hidden_states(model, batch)
        for module in model.modules():
            if hasattr(module, "attn_logit_softcapping"):
                module.attn_logit_softcapping = None
        uncapped = hidden_states(model, batch)
    assert (h - uncapped).abs().max() > 1e-3
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    capped = capped_attention(q, k, v, None, None, 0.0, softcap=1e6)  # a cap that never binds
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(capped, plain, atol=1e-6, rtol=1e-6)


def test_each_layer_type_gets_its_own_mask():
    model = family_model("gemma3", "sdpa")
    assert layer_windows(model) == {"sliding_attention": WINDOW, "full_attention": None}
    long = build_batch(long_pairs(seed=2), "packed", pad_token_id=0, max_row_tokens=48)
    masks = model_attention_mask(model, long)
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert torch.equal(masks["full_attention"], long.dense_mask())
    assert torch.equal(masks["sliding_attention"], windowed_dense_mask(long, WINDOW))
    # a batch no window binds in: one mask object under both keys (no second dense mask)
    short = build_batch(long_pairs(seed=2, shapes=[(2, 3, 2)] * 3), "packed", pad_token_id=0)
    masks = model_attention_mask(model, short)
    assert masks["sliding_attention"] is masks["full_attention"]
    mistral = family_model("mistral", "sdpa")  # one layer type: one mask, windowed
    assert torch.equal(model_attention_mask(mistral, long), windowed_dense_mask(long, WINDOW))


def test_windowed_mask_is_transformers_rule_on_positions():
    """q - k < window on pair-relative positions (transformers' sliding_window_overlay), in a
    mask written out here pair by pair."""
    batch = build_batch(long_pairs(seed=3), "packed", pad_token_id=0, max_row_tokens=48)
    got = windowed_dense_mask(batch, WINDOW)[:, 0]
    dense, pos = batch.dense_mask()[:, 0], batch.position_ids
    for r in range(got.shape[0]):
        for q in range(got.shape[1]):
            for k in range(got.shape[2]):
                want = bool(dense[r, q, k]) and int(pos[r, q]) - int(pos[r, k]) < WINDOW
                assert bool(got[r, q, k]) == want


# ----------------------------------------------------------------------------- support checks
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "qwen2"])
def test_sliding_window_models_keep_the_layouts(family):
    model = family_model(family, "eager")
    for layout in ("shared", "packed"):
        got = supports_layout(model, layout, max_seq_len=4 * WINDOW)
        assert got.ok and "probe matches" in got.reason, (family, got.reason)


def test_what_cannot_be_handled_still_falls_back_with_its_reason():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      attention_chunk_size=16)
    chunked = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    got = supports_layout(chunked, "packed")
    assert not got.ok and "chunked attention" in got.reason
    flash = family_model("mistral", "sdpa")
    flash.config._attn_implementation = "flash_attention_2"  # only the name is checked
    got = supports_layout(flash, "shared")
    assert not got.ok and "flash_attention_2" in got.reason


# ----------------------------------------------------------------------------- FlexAttention
def test_windowed_block_mask_is_sound_against_torchs():
    """flex_block_mask with a window: every (query, key) the rule allows lies in a tile it
    keeps, and a tile it calls full really is (the kernel skips the mask_mod there); partial
    tiles are allowed to be conservative. Compared with torch's create_block_mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    rng = random.Random(0)
    for trial in range(12):
        pairs = [([5] * rng.randint(1, 250), [6] * rng.randint(1, 250), [7] * rng.randint(1, 250))
                 for _ in range(rng.randint(1, 4))]
        layout = "packed" if trial % 2 else "shared"
        batch = build_batch(pairs, layout, pad_token_id=0,
                            max_row_tokens=1000 if layout == "packed" else None)
        window = rng.choice([64, 100, 200])
        seg, part, pos = batch.segment_ids, batch.part.long(), batch.position_ids
        rows, length = seg.shape
        ref = flex.create_block_mask(flex_mask_mod(seg, part, pos, window), rows, None,
                                     length, length, device="cpu")
        (gp, gf), (rp, rf) = _tiles(flex_block_mask(batch, window)), _tiles(ref)
        assert not (gf & ~rf).any()  # full only where every pair is allowed
        assert not ((rp | rf) & ~(gp | gf)).any()  # nothing allowed is skipped
        dense = windowed_dense_mask(batch, window)
        q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
        by_mod = torch.stack([flex_mask_mod(seg, part, pos, window)(b, 0, q, kv)
                              for b in range(rows)])[:, None]
        assert torch.equal(by_mod, dense)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_flex_attention_applies_the_window(family, eager_flex):  # noqa: F811
    """FlexAttention's forward (run uncompiled on the CPU, see tests/test_flex.py) with the
    windowed BlockMask per layer type gives the padded layout's hidden states; Gemma 2's cap
    is transformers' score_mod."""
    model = family_model(family, "eager")  # the reference: transformers' eager, padded rows
    pairs = long_pairs(seed=4)
    with evaluating(model):
        ref_b = build_batch(pairs, "padded", pad_token_id=0, sft_on_prompt=True)
        ref = hidden_states(model, ref_b).flatten(0, 1)[ref_b.score_index]
        switch(model, "flex_attention")
        for layout in ("shared", "packed"):
            b = build_batch(pairs, layout, pad_token_id=0, sft_on_prompt=True,
                            max_row_tokens=48)
            got = hidden_states(model, b).flatten(0, 1)[b.score_index]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert eager_flex["block_mask"] > 0

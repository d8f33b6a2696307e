"""FlexAttention (--attn-implementation flex_attention): the shared/packed layouts reach it as a
BlockMask and give the padded layout's hidden states.

torch has no FlexAttention backward on the CPU, so training with it is CUDA-only (refused on
the CPU before anything loads) and these tests check the forward: that is where the layout
lives (mask + position ids); the backward is flex_attention's own. They run flex_attention
uncompiled: transformers compiles it on first use, and inductor's CPU code for it is slow to
build and fails to compile for some packed shapes (torch 2.13); the math is the same.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qorpo.attention.masks import model_attention_mask
from qorpo.data.collate import build_batch
from qorpo.errors import ConfigError
from qorpo.forward import evaluating, hidden_states, supports_layout
from qorpo.model import check_attn_implementation
from tests.test_layout import VOCAB, random_pairs

flex = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers' flex_attention_forward, with flex_attention run eagerly (see above)."""
    import transformers.integrations.flex_attention as tf_flex

    calls = {"block_mask": 0}

    def uncompiled(query, key, value, training=False, **kwargs):
        if isinstance(kwargs.get("block_mask"), flex.BlockMask):
            calls["block_mask"] += 1
        return flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(tf_flex, "compile_friendly_flex_attention", uncompiled)
    return calls


def _flex_model(arch: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    torch.manual_seed(0)
    cfg = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="flex_attention")
    with torch.no_grad():  # random init is near-uniform: make the attention matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flex_block_mask_gives_the_padded_hidden_states(arch, eager_flex):
    model = _flex_model(arch)
    pairs = random_pairs(seed=21, n=7)  # odd lengths, 1-token prompts and responses among them
    ref = build_batch(pairs, "padded", pad_token_id=2, sft_on_prompt=True)
    with evaluating(model):
        h_ref = hidden_states(model, ref).flatten(0, 1)[ref.score_index]  # (N, H)
        for layout in ("shared", "packed"):
            batch = build_batch(pairs, layout, pad_token_id=2, sft_on_prompt=True,
                                max_row_tokens=60)
            assert isinstance(model_attention_mask(model, batch), flex.BlockMask)
            before = eager_flex["block_mask"]
            got = hidden_states(model, batch).flatten(0, 1)[batch.score_index]
            assert eager_flex["block_mask"] - before == 2  # every layer got the BlockMask
            torch.testing.assert_close(got, h_ref, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, lay=layout: f"{lay}: {m}")
        packed = build_batch(pairs, "packed", pad_token_id=2, max_row_tokens=60)
        assert packed.input_ids.shape[0] < len(pairs)  # pairs really share rows


def test_flex_attention_passes_the_layout_probe(eager_flex):
    model = _flex_model("llama")
    for layout in ("shared", "packed"):
        got = supports_layout(model, layout, max_seq_len=64)
        assert got.ok and "flex_attention" in got.reason and "probe matches" in got.reason


def _tiles(mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) (R, nQ, nK) bool tiles of a BlockMask, from its kv index lists."""
    def dense(num, idx):
        rows, _, n = num.shape
        out = torch.zeros(rows, n, idx.shape[-1], dtype=torch.bool)
        for r in range(rows):
            for q in range(n):
                out[r, q, idx[r, 0, q, :int(num[r, 0, q])].long()] = True
        return out

    return (dense(mask.kv_num_blocks, mask.kv_indices),
            dense(mask.full_kv_num_blocks, mask.full_kv_indices))


def test_block_mask_tiles_equal_torchs_without_a_dense_mask(monkeypatch):
    """qorpo.attention.flex.flex_block_mask classifies 128 x 128 tiles from segment ranges; torch's
    create_block_mask evaluates the mask_mod on every (query, key). Same empty, partial and
    full tiles on random shared/packed batches (rows of 1-2.4k tokens, lengths that are not
    multiples of 128, pairs numbered out of order in packed rows), and no dense grid built."""
    import random

    from qorpo.attention.flex import flex_block_mask, flex_mask_mod

    rng = random.Random(0)
    batches = []
    for _ in range(40):
        pairs = [([5] * rng.randint(1, 300), [6] * rng.randint(1, 300), [7] * rng.randint(1, 300))
                 for _ in range(rng.randint(1, 6))]
        layout = rng.choice(["shared", "packed"])
        batches.append(build_batch(pairs, layout, pad_token_id=0, max_row_tokens=(
            rng.choice([None, 1500]) if layout == "packed" else None)))
    refs = [flex.create_block_mask(flex_mask_mod(b.segment_ids, b.part.long()),
                                   b.segment_ids.shape[0], None, b.segment_ids.shape[1],
                                   b.segment_ids.shape[1], device="cpu") for b in batches]
    monkeypatch.setattr(flex, "create_mask", lambda *a, **k: pytest.fail("dense mask built"))
    monkeypatch.setattr(flex, "create_block_mask",
                        lambda *a, **k: pytest.fail("dense mask built"))
    kinds = torch.zeros(2)
    for batch, ref in zip(batches, refs, strict=True):
        got = flex_block_mask(batch)
        (gp, gf), (rp, rf) = _tiles(got), _tiles(ref)
        assert torch.equal(gp, rp) and torch.equal(gf, rf)
        kinds += torch.tensor([float(gp.sum()), float(gf.sum())])
        assert got.seq_lengths == ref.seq_lengths
    assert kinds.min() > 0  # both partial and full tiles occurred


def test_a_wrong_block_mask_is_caught(eager_flex, monkeypatch):
    """Guard on the test above: a BlockMask that lets rejected tokens see the chosen ones
    changes the rejected hidden states (so equality there is not vacuous)."""
    import qorpo.attention.flex as fw

    model = _flex_model("llama")
    monkeypatch.setattr(fw, "flex_mask_mod", lambda seg, part: (
        lambda b, h, q, kv: (seg[b, q] == seg[b, kv]) & (kv <= q)))
    got = supports_layout(model, "shared", max_seq_len=64)
    assert not got.ok and "differ from padded" in got.reason


def test_flex_attention_is_refused_on_the_cpu_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="flex_attention trains only on a CUDA GPU"):
        check_attn_implementation("flex_attention", torch.device("cpu"))
    check_attn_implementation("flex_attention", torch.device("cuda"))  # allowed there
    check_attn_implementation("sdpa", torch.device("cpu"))
    check_attn_implementation(None, torch.device("cpu"))


def test_cli_flex_attention_on_cpu_is_one_line(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from qorpo.cli.app import app

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    out = CliRunner().invoke(app, ["train", "--model", str(tiny_llama), "--data", str(data),
                                   "--output-dir", str(tmp_path / "o"),
                                   "--attn-implementation", "flex_attention"])
    assert out.exit_code == 2, out.output
    assert "flex_attention trains only on a CUDA GPU" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "o").exists()

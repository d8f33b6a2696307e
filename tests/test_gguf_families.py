"""GGUF export across model families (issue #19): a tiny random model per family, exported as f16
and q8_0, verified (transformers' GGUF loader where it reads the family, else the independent
read-back), with llama.cpp's per-family metadata checked; variants llama.cpp would run
differently are refused in one line; SentencePiece tokenizers (trained here) export as
``tokenizer.ggml.model = "llama"``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from qorpo.errors import MergeError, MergeVerificationError
from qorpo.export import export_gguf
from qorpo.export import gguf as gguf_writer
from tests.tiny import make_tokenizer

# family -> (model_type, config overrides): hidden 64, 2 layers, 4 heads of 16, 2 KV heads
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "gemma3": ("gemma3_text", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                            "attention_multiplier": 0.1, "logits_scaling": 4.0}),
    "smollm3": ("smollm3", {}),
    "gpt_neox": ("gpt_neox", {"rotary_pct": 0.5, "num_key_value_heads": None}),
    "stablelm": ("stablelm", {"partial_rotary_factor": 0.5, "use_qkv_bias": True}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "cohere": ("cohere", {"logit_scale": 0.5}),
    "glm4": ("glm4", {"partial_rotary_factor": 0.5, "head_dim": 16}),
}  # fmt: skip
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "gpt_neox": "gptneox", "mixtral": "llama",
             "cohere": "command-r"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def family_model(out: Path, family: str, tokenizer: Any = None, *,
                 spec: tuple[str, dict[str, Any]] | None = None, **overrides: Any) -> Path:
    """A tiny random model of ``family`` (``spec``: its (model_type, config overrides), default
    FAMILIES[family]) saved like a merged folder; every weight (norms and biases too, so
    offsets and biases count) random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = spec or FAMILIES[family]
    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
    cfg = AutoConfig.for_model(model_type, **(common | kw | overrides))
    model = AutoModelForCausalLM.from_config(cfg)
    model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() >= 2 else 0.1)
            if p.dim() == 1 and "norm" in name and not model_type.startswith("gemma"):
                p.add_(1.0)  # around 1, as trained norms are (Gemma's are around 0)
    model.save_pretrained(out)
    (tokenizer or make_tokenizer()).save_pretrained(out)
    return out


def _fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores")  # fmt: skip
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in skip}
    return fields, {t.name: t for t in reader.tensors}


# f16: every family, exported from a trained and merged adapter, in tests/test_families.py (with
# the same exactness assertion); here q8_0 and each family's keys and layouts
@pytest.mark.parametrize("out_type", ["q8_0"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_and_verifies(tmp_path: Path, family: str, out_type: str) -> None:
    src = family_model(tmp_path / family, family)
    result = export_gguf(src, tmp_path / "out", out_type=out_type, name="tiny")
    report = result.verification
    assert report is not None and report.passed, report.summary()
    scale = 3.0  # logits of these tiny models stay below ~3 (tolerances are relative)
    assert report.exact_gap <= 1e-5 * scale and report.max_abs <= report.tolerance
    if out_type == "f16":  # the file holds exactly the rounded weights: gap == the rounding
        assert report.max_abs <= 1.01 * report.rounding_gap + 1e-5 * scale
    arch = GGUF_ARCH.get(family, family)
    fields, tensors = _fields(result.path)
    assert fields["general.architecture"] == arch == result.arch
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == 64
    assert len(tensors) == result.tensors
    _family_specifics(family, arch, fields, tensors, src)


def _family_specifics(
    family: str, arch: str, fields: dict[str, Any], tensors: dict[str, Any], src: Path
) -> None:
    """The metadata and tensor layout llama.cpp needs, read from the file."""
    from safetensors.torch import load_file

    weights = load_file(src / "model.safetensors")
    if family in ("qwen3_moe", "mixtral"):
        assert fields[f"{arch}.expert_count"] == 4 and fields[f"{arch}.expert_used_count"] == 2
        gate = tensors["blk.0.ffn_gate_exps.weight"]
        assert gate.shape.tolist()[::-1][0] == 4  # stacked: (experts, rows, cols)
        assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    if family == "qwen3_moe":
        assert fields["qwen3moe.expert_feed_forward_length"] == 32
    if family.startswith("gemma"):  # llama.cpp multiplies by the stored norm: 1 + w stored
        stored = np.asarray(tensors["blk.0.attn_norm.weight"].data)
        hf = weights["model.layers.0.input_layernorm.weight"].numpy()
        assert np.allclose(stored, hf + 1.0) and "output.weight" not in tensors
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 5.0
        assert fields["gemma2.final_logit_softcapping"] == 3.0
        assert fields["gemma2.attention.sliding_window"] == 8
    if family == "gemma3":
        assert fields["gemma3.attention.sliding_window"] == 8
        assert fields["gemma3.attention.key_length"] == 32 and "blk.0.attn_q_norm.weight" in tensors
        assert fields["gemma3.rope.freq_base"] == 1e6
    if family in ("gpt_neox", "stablelm", "glm4"):
        assert fields[f"{arch}.rope.dimension_count"] == 8  # partial rotary: half of 16
    if family in ("gpt_neox", "stablelm", "cohere"):
        assert fields[f"{arch}.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    if family == "gpt_neox":
        assert fields["gptneox.use_parallel_residual"] is True
        qkv = weights["gpt_neox.layers.0.attention.query_key_value.weight"].numpy()
        stored = gguf.quants.dequantize(tensors["blk.0.attn_qkv.weight"].data,
                                        tensors["blk.0.attn_qkv.weight"].tensor_type)
        q_head0 = qkv.reshape(4, 3, 16, 64)[0, 0]  # HF: head-major (q, k, v) per head
        assert np.allclose(np.asarray(stored).reshape(192, 64)[:16], q_head0, atol=2e-3)
    if family == "granite":
        assert fields["granite.embedding_scale"] == 2.0 and fields["granite.logit_scale"] == 4.0
        assert fields["granite.residual_scale"] == 0.5
        assert fields["granite.attention.scale"] == pytest.approx(0.1)
    if family == "cohere":
        assert fields["command-r.logit_scale"] == 0.5 and "output.weight" not in tensors
    if family in ("phi3", "glm4"):  # fused gate_up stays fused as ffn_up
        assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [64, 256]
        assert "blk.0.ffn_gate.weight" not in tensors
    if family == "phi3":
        assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [64, 128]
    if family in ("qwen3", "olmo2"):
        assert "blk.0.attn_q_norm.weight" in tensors and "blk.0.attn_k_norm.weight" in tensors


# ----------------------------------------------------------------------------- SentencePiece


def sentencepiece_tokenizer(folder: Path, style: str) -> Any:
    """A SentencePiece BPE with byte fallback trained here (Llama 2 / Mistral style: a "▁" word
    prefix; Gemma style: none), loaded by transformers from its tokenizer.model."""
    import io

    import sentencepiece as spm  # a dev dependency (never skipped: a missing one fails)
    from transformers import GemmaTokenizer, LlamaTokenizer

    from tests.tiny import _CORPUS, CHATML_TEMPLATE

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        add_dummy_prefix=style == "llama", minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    cls = GemmaTokenizer if style == "gemma" else LlamaTokenizer
    tok = cls.from_pretrained(str(folder))
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.mark.parametrize(
    ("style", "keep_model"), [("llama", True), ("llama", False), ("gemma", True)]
)
def test_sentencepiece_tokenizer_exports_as_llama_vocab(
    tmp_path: Path, style: str, keep_model: bool
) -> None:
    """tokenizer.model read by gguf's SentencePieceVocab, or (without it) the tokenizer.json
    transformers converted it to, by gguf's LlamaHfVocab; the verification encodes the prompts
    and a test string with transformers' GGUF tokenizer built from the file and compares ids."""
    import shutil

    tok = sentencepiece_tokenizer(tmp_path / "spm", style)
    family = "gemma" if style == "gemma" else "llama"
    if family == "gemma":
        src = family_model(tmp_path / "m", "gemma", tokenizer=tok, vocab_size=len(tok))
    else:
        from tests.tiny import make_model

        src = make_model(tmp_path / "m", tokenizer=tok, vocab_size=len(tok))
    if keep_model:  # transformers 5 saves tokenizer.json only; a merged folder may carry both
        shutil.copy(tmp_path / "spm" / "tokenizer.model", src / "tokenizer.model")
    result = export_gguf(src, tmp_path / "out", out_type="q8_0", name="spm")
    report = result.verification
    assert report is not None and report.passed, report.summary()
    assert report.tokens_checked > 40
    reader = gguf.GGUFReader(result.path)
    fields = {k: f.contents() for k, f in reader.fields.items()
              if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")}  # fmt: skip
    assert fields["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in fields and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is (style == "llama")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = fields["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == len(tok)
    byte = tokens.index("<0x41>")  # byte fallback pieces, typed BYTE as llama.cpp wants
    assert types[byte] == gguf.TokenType.BYTE and types[tokens.index("<|im_end|>")] in (
        gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL)
    merged = [s for t, s, k in zip(tokens, scores, types, strict=True)
              if k == gguf.TokenType.NORMAL and len(t) > 1]  # fmt: skip
    assert merged and len(set(merged)) == len(merged)  # ranked, not LlamaHfVocab's -1000s
    assert fields.get("tokenizer.ggml.unknown_token_id") == 0, sorted(fields)


# ----------------------------------------------------------------------------- faults, refusals


@pytest.mark.parametrize(
    ("family", "fault"),
    [("gemma", "no_norm_offset"), ("gpt_neox", "qkv_order"), ("mixtral", "expert_order"),
     ("glm4", "scaled_tensor"), ("granite", "no_permute"), ("gemma2", "no_softcap")],
)  # fmt: skip
def test_a_wrong_family_file_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, fault: str
) -> None:
    """Each per-family transform, broken in the writer alone, is caught by the check that
    family gets (read-back for Gemma / GPT-NeoX / Mixtral / GLM-4 / Granite, transformers'
    loader plus the metadata comparison for Gemma 2); nothing is left behind."""
    src = family_model(tmp_path / family, family)
    convert = gguf_writer.convert_tensor

    def broken(t: gguf_writer.TensorPlan) -> np.ndarray:
        if fault == "no_norm_offset":
            t = t._replace(offset=0.0)
        elif fault == "expert_order" and t.stack:
            t = t._replace(stack=t.stack[::-1])
        data = convert(t)
        if fault == "scaled_tensor" and t.name == "blk.1.ffn_up.weight":
            data = (data * 1.01).astype(data.dtype)
        return data

    monkeypatch.setattr(gguf_writer, "convert_tensor", broken)
    if fault == "qkv_order":
        monkeypatch.setattr(gguf_writer, "neox_qkv", lambda w, n: w)
    elif fault == "no_permute":
        monkeypatch.setattr(gguf_writer, "llama_permute", lambda w, n: w)
    elif fault == "no_softcap":  # the writer's table says 3x the final soft-cap
        import dataclasses

        from qorpo.export import families

        gemma2 = families.FAMILIES["Gemma2ForCausalLM"]

        def extra(c: dict[str, Any]) -> dict[str, Any]:
            return gemma2.extra(c) | {gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING: 9.0}

        monkeypatch.setitem(families.FAMILIES, "Gemma2ForCausalLM",
                            dataclasses.replace(gemma2, extra=extra))  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(MergeVerificationError, match="GGUF file disagrees") as err:
        export_gguf(src, out, out_type="f16")
    assert err.value.report.problems
    if fault == "no_softcap":
        assert any("final_logit_softcapping" in p for p in err.value.report.problems)
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar=256"),
        ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]},
         "llama.cpp runs the fixed pattern"),
        ("gemma3", {"rope_local_base_freq": 20000.0}, "hard-codes 10000"),
        ("qwen3_moe", {"norm_topk_prob": False}, "renormalises the top-k"),
        ("smollm3", {"no_rope_layers": [1, 0]}, "SmolLM3 with no_rope_layers"),
        ("stablelm", {"qk_layernorm": True}, "qk_layernorm is not supported"),
    ],
)  # fmt: skip
def test_variants_llama_cpp_runs_differently_are_refused(
    tmp_path: Path, family: str, overrides: dict[str, Any], message: str
) -> None:
    src = family_model(tmp_path / family, family)
    config = json.loads((src / "config.json").read_text())
    if family == "gemma3" and "rope_local_base_freq" in overrides:  # transformers 5 nests it
        config["rope_parameters"]["sliding_attention"]["rope_theta"] = 20000.0
    (src / "config.json").write_text(json.dumps(config | overrides))
    with pytest.raises(MergeError, match=message) as err:
        export_gguf(src, tmp_path / "out", verify=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_an_architecture_llama_cpp_lacks_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(MergeError, match="does not support architecture 'GPT2LMHeadModel'.*Gemma3"):
        export_gguf(tmp_path / "gpt2", tmp_path / "out")


@pytest.mark.parametrize(("family", "targets"), [("gemma2", ["q_proj", "down_proj"]),
                                                 ("gpt_neox", ["query_key_value"])])
def test_merge_gguf_end_to_end(tmp_path: Path, family: str, targets: list[str]) -> None:
    """`qorpo merge --gguf` on a LoRA of a non-Llama family: merged, exported, both verified
    (Gemma 2 through transformers' loader, GPT-NeoX through the read-back)."""
    from qorpo.merging import merge
    from tests.test_merge import make_adapter

    base = family_model(tmp_path / family, family)
    adapter = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=targets)
    result = merge(adapter, tmp_path / "merged", dtype="fp32", gguf="q8_0")
    assert result.verification is not None and result.verification.passed
    report = result.gguf.verification
    assert report is not None and report.passed, report.summary()
    assert report.method.startswith("transformers" if family == "gemma2" else "independent")
    assert result.gguf.arch == GGUF_ARCH.get(family, family)

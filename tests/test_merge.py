"""qorpo.merging: streaming LoRA merge == peft, NF4-aware merge, verification, crash safety, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from qorpo.errors import MergeError, MergeVerificationError
from qorpo.merging import merge
from qorpo.merging.adapter import LoraModule, lora_delta, peft_scale
from qorpo.merging.plan import model_info
from qorpo.merging.shards import ShardWriter
from qorpo.merging.verify import compare, logits_of, prompt_batch, verify_merged
from qorpo.quant import nf4_round_trip
from tests.tiny import CHATML_TEMPLATE, make_model, make_tokenizer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[5, 17, 33, 60, 2, 90, 120, 7]])


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def _fp32(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def make_adapter(base: Path, out: Path, *, tokenizer: Any = None, **lora: Any) -> Path:
    """A LoRA adapter with non-zero B (so every delta is real) and perturbed modules_to_save."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(_fp32(base), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def peft_model(base: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_fp32(base), str(adapter)).eval()


def assert_close_logits(want: torch.Tensor, got: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32-noise agreement, relative to the logit scale (random LoRAs make logits large)."""
    diff = (want - got).abs().max().item()
    assert diff <= rtol * max(1.0, want.abs().max().item()), diff


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_matches_peft_merge(base: Path, adapter: Path, merged: Path) -> None:
    ref = peft_model(base, adapter).merge_and_unload().state_dict()
    got = read_weights(merged)
    assert set(got) <= set(ref)
    assert set(ref) - set(got) <= {"lm_head.weight"}  # only a tied lm_head may be left out
    for key, value in got.items():
        assert value.dtype == torch.float32
        diff = (value - ref[key]).abs().max().item()
        assert diff <= 1e-6, f"{key}: {diff}"


# ----------------------------------------------------------------------------- exactness


CASES = {
    # untied llama, several input shards, patterns, all linear layers, lm_head fully trained
    "llama-sharded-patterns-mts": (
        dict(arch="llama", max_shard_size="100KB"),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=ALL_LINEAR,
            rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6},
            alpha_pattern={"layers.1.self_attn.q_proj": 3, "down_proj": 24},
            modules_to_save=["lm_head"],
        ),
    ),
    # tied llama, single file; adapter leaves the embeddings alone, so it stays tied
    "llama-single-tied": (
        dict(arch="llama", tie=True),
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    ),
    # qwen2 (q/k/v have biases), sharded, rslora, LoRA on the embedding too
    "qwen2-sharded-rslora-embed": (
        dict(arch="qwen2", max_shard_size="100KB"),
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=[*ALL_LINEAR, "embed_tokens"]),
    ),
    # qwen2 single file with a trained LoRA bias folded into the q/k/v biases
    "qwen2-single-lora-bias": (
        dict(arch="qwen2"),
        dict(r=4, lora_alpha=4, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stream_merge_equals_peft_merge_and_unload(tmp_path: Path, case: str) -> None:
    model_kw, lora_kw = CASES[case]
    base = make_model(tmp_path / "base", **model_kw)
    adapter = make_adapter(base, tmp_path / "adapter", **lora_kw)
    result = merge(adapter, tmp_path / "out", dtype="fp32", max_shard_size="120KB", verify=False)
    assert_matches_peft_merge(base, adapter, result.out_dir)
    sharded = "max_shard_size" in model_kw
    assert (len(result.weight_files) > 1) == sharded or not sharded
    assert (result.out_dir / "model.safetensors.index.json").is_file() == (
        len(result.weight_files) > 1
    )
    assert result.untied == ()
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] == model_kw.get("tie", False)


def test_single_output_file_when_it_fits(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", max_shard_size="100KB")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    result = merge(adapter, tmp_path / "out", verify=False)  # 5GB default: one file
    assert result.weight_files == ("model.safetensors",)
    assert not (result.out_dir / "model.safetensors.index.json").exists()
    assert_matches_peft_merge(base, adapter, result.out_dir)


def test_lora_delta_layouts() -> None:
    a, b = torch.randn(3, 5), torch.randn(7, 3)
    assert torch.allclose(lora_delta(a, b, 2.0), 2.0 * b @ a)
    assert torch.allclose(lora_delta(a, b, 2.0, fan_in_fan_out=True), 2.0 * (b @ a).T)
    assert torch.allclose(lora_delta(a, b, 0.5, embedding=True), 0.5 * (b @ a).T)
    for kind in ({}, {"fan_in_fan_out": True}, {"embedding": True}):
        module = LoraModule("m", a, b, 1.5, **kind)
        w = torch.zeros(module.weight_shape)
        module.add_to_(w)
        assert torch.allclose(w, lora_delta(a, b, 1.5, **kind), atol=1e-6)


def test_peft_scale_patterns_and_rslora() -> None:
    cfg = {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"v_proj": 4},
        "alpha_pattern": {"layers.1.q_proj": 2},
    }
    assert peft_scale(cfg, "model.layers.0.q_proj", 8) == 2.0
    assert peft_scale(cfg, "model.layers.0.v_proj", 4) == 4.0
    assert peft_scale(cfg, "model.layers.1.q_proj", 8) == 0.25
    assert peft_scale(cfg, "model.layers.11.q_proj", 8) == 2.0  # "layers.1." must not match 11
    assert peft_scale({"r": 16, "lora_alpha": 8, "use_rslora": True}, "x", 16) == 2.0
    with pytest.raises(MergeError, match="rank 3"):
        peft_scale(cfg, "model.layers.0.q_proj", 3)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=320,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "base"))
    make_tokenizer(tmp_path / "base")
    kw = dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"])
    adapter = make_adapter(tmp_path / "base", tmp_path / "a", **kw)
    result = merge(adapter, tmp_path / "out", verify=False)
    assert_matches_peft_merge(tmp_path / "base", adapter, result.out_dir)


# ----------------------------------------------------------------------------- tied embeddings


TIED_CASES = {
    "lora-embed": (dict(target_modules=["q_proj", "embed_tokens"]), True),
    "lora-lm_head": (dict(target_modules=["q_proj", "lm_head"]), True),
    "modules_to_save-embed": (
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        True,
    ),
    # the adapter's saved copy of the shared matrix differs from the checkpoint (trained in bf16)
    "lora-embed-bf16-base-layer": (dict(target_modules=["q_proj", "embed_tokens"]), True),
    "ensure_weight_tying": (
        dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
        False,
    ),
}


@pytest.mark.parametrize("case", list(TIED_CASES))
def test_tied_weights_untied_only_when_the_adapter_splits_them(tmp_path: Path, case: str) -> None:
    from transformers import AutoModelForCausalLM

    lora_kw, expect_untied = TIED_CASES[case]
    base = make_model(tmp_path / "base", tie=True)
    adapter = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, **lora_kw)
    if "bf16" in case:
        file = str(adapter / "adapter_model.safetensors")
        weights = load_file(file)
        key = "base_model.model.model.embed_tokens.base_layer.weight"
        weights[key] = weights[key].bfloat16().float()
        save_file(weights, file)
    result = merge(adapter, tmp_path / "out", verify=False)
    if "bf16" in case:  # --method full must agree
        full = merge(adapter, tmp_path / "full", method="full", verify=False)
        want = peft_model(base, adapter)(IDS).logits
        assert_close_logits(
            want, AutoModelForCausalLM.from_pretrained(str(full.out_dir))(IDS).logits
        )
    assert result.untied == (("lm_head.weight",) if expect_untied else ())
    assert any("untied lm_head.weight" in n for n in result.notes) == expect_untied
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is (not expect_untied)
    assert ("lm_head.weight" in read_weights(result.out_dir)) == expect_untied
    # Ground truth is peft's forward (its merge_and_unload gets tied weights wrong here).
    want = peft_model(base, adapter)(IDS).logits
    got = AutoModelForCausalLM.from_pretrained(str(result.out_dir))(IDS).logits
    assert_close_logits(want, got)


# ----------------------------------------------------------------------------- --into dequantized


def test_nf4_round_trip_is_what_the_4bit_model_holds(tmp_path: Path) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = make_model(tmp_path / "base")
    info = model_info(base)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    m4 = AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=quant, dtype=torch.float32, device_map="cpu"
    )
    four_bit = {f"{n}.weight": m for n, m in m4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(four_bit) == set(info.quantized)  # same set transformers quantises
    assert "lm_head.weight" not in info.quantized and len(info.quantized) == 14
    weights = read_weights(base)
    for key, module in four_bit.items():
        held = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(held, nf4_round_trip(weights[key])), key


def test_dequantized_merge_is_closer_to_4bit_training_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from qorpo.merging.verify import load_reference

    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    plain = merge(adapter, tmp_path / "orig", into="original", verify=False)
    deq = merge(adapter, tmp_path / "deq", into="dequantized", verify=False)
    trained = logits_of(load_reference(base, adapter, four_bit=True), [IDS])
    gap = {
        r.into: compare(
            trained, logits_of(AutoModelForCausalLM.from_pretrained(str(r.out_dir)), [IDS])
        )
        for r in (plain, deq)
    }
    assert gap["original"].max_abs > 0.05  # the NF4 error is visible in this model
    assert gap["dequantized"].max_abs < 1e-4 < gap["original"].max_abs
    assert gap["dequantized"].mean_abs < gap["original"].mean_abs / 100
    # lm_head and embeddings are never quantised: identical in both merges
    a, b = read_weights(plain.out_dir), read_weights(deq.out_dir)
    assert torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"]
    )


# ----------------------------------------------------------------------------- verification


def test_verification_passes_and_reports_the_other_gap(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    for into in ("original", "dequantized"):
        report = merge(adapter, tmp_path / into, into=into, dtype="fp32", verify=True).verification
        assert report is not None and report.passed, report
        assert report.gap.max_abs < 1e-4 and report.gap.agreement == 1.0
        assert report.other_gap is not None and report.other_gap.max_abs > report.gap.max_abs
        assert report.adapter_effect is not None and report.adapter_effect.max_abs > 0.1
        assert ("4-bit" in report.reference) == (into == "dequantized")


def test_verification_fails_on_a_corrupted_merge(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    result = merge(adapter, tmp_path / "out", dtype="fp32", verify=False)
    weights = load_file(str(result.out_dir / "model.safetensors"))
    key = "model.layers.1.self_attn.v_proj.weight"
    weights[key] = weights[key] * 1.02  # a 2% error in one matrix
    save_file(weights, str(result.out_dir / "model.safetensors"), metadata={"format": "pt"})
    report = verify_merged(result.out_dir, adapter, base, dtype="fp32", other=False)
    assert not report.passed and report.gap.max_abs > report.tolerance
    assert "FAILED" in report.summary()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_raises_and_writes_nothing_when_verification_fails(
    tmp_path: Path, monkeypatch, dtype: str
) -> None:
    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    original = LoraModule.add_to_

    def twice(self: LoraModule, weight: torch.Tensor) -> None:  # a scaling bug
        original(self, weight)
        original(self, weight)

    monkeypatch.setattr(LoraModule, "add_to_", twice)
    with pytest.raises(MergeVerificationError, match="disagrees") as err:
        merge(adapter, tmp_path / "out", dtype=dtype, verify=True)
    assert not err.value.report.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_after_first_shard_leaves_nothing(
    tmp_path: Path, monkeypatch, exc: BaseException
) -> None:
    base = make_model(tmp_path / "base", max_shard_size="100KB")
    adapter = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    original = ShardWriter._finish_shard

    def crash(self: ShardWriter) -> None:
        original(self)
        raise exc

    monkeypatch.setattr(ShardWriter, "_finish_shard", crash)
    with pytest.raises(type(exc)):
        merge(adapter, tmp_path / "out", max_shard_size="100KB", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]  # no out, no temp folder


def test_mismatched_adapter_names_the_module(tmp_path: Path) -> None:
    small = make_model(tmp_path / "small", hidden_size=32)
    other = make_model(tmp_path / "other", hidden_size=64)
    adapter = make_adapter(other, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(MergeError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*does not fit"):
        merge(adapter, tmp_path / "out", base=small, verify=False)
    # an adapter module the base does not have at all
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    renamed = {
        k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v
        for k, v in weights.items()
    }
    save_file(renamed, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(
        MergeError, match=r"'model\.layers\.1\.self_attn\.qq_proj' matches no weight"
    ):
        merge(adapter, tmp_path / "out", base=other, verify=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(MergeError, match="already exists.*--force"):
        merge(adapter, out, verify=False)
    assert (out / "old.txt").read_text() == "keep me"
    # --force replaces only an earlier merge's folder (issue 18 item 20): this one is the user's
    with pytest.raises(MergeError, match="not one"):
        merge(adapter, out, verify=False, force=True)
    assert (out / "old.txt").read_text() == "keep me"
    (out / "old.txt").unlink()
    merge(adapter, out, verify=False, force=True)  # empty: fine
    result = merge(adapter, out, verify=False, force=True)  # an earlier merge: replaced, said
    assert (out / "model.safetensors").is_file() and any("replaced" in n for n in result.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base", "out"]
    with pytest.raises(MergeError, match="overwrite the input"):
        merge(adapter, adapter, verify=False, force=True)


def test_pickle_base_needs_allow_pickle(tmp_path: Path) -> None:
    base = make_model(tmp_path / "st")
    adapter = make_adapter(
        base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]
    )
    pickled = tmp_path / "bin"  # an old-style checkpoint (transformers 5 only writes safetensors)
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(load_file(str(base / "model.safetensors")), str(pickled / "pytorch_model.bin"))
    with pytest.raises(MergeError, match="--allow-pickle"):
        merge(adapter, tmp_path / "out", base=pickled, verify=False)
    result = merge(adapter, tmp_path / "out", base=pickled, verify=False, allow_pickle=True)
    assert_matches_peft_merge(base, adapter, result.out_dir)


def test_dora_needs_full_method_which_works(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "a", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]
    )
    with pytest.raises(MergeError, match="use_dora.*--method full"):
        merge(adapter, tmp_path / "out", verify=False)
    result = merge(adapter, tmp_path / "out", method="full", dtype="fp32", verify=False)
    want = peft_model(base, adapter)(IDS).logits
    assert_close_logits(want, _fp32(result.out_dir)(IDS).logits)


def test_full_method_handles_tied_embeddings_like_stream(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", tie=True)
    adapter = make_adapter(
        base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]
    )
    full = merge(adapter, tmp_path / "full", method="full", verify=False)
    stream = merge(adapter, tmp_path / "stream", verify=False)
    assert full.untied == stream.untied == ("lm_head.weight",)
    a, b = read_weights(full.out_dir), read_weights(stream.out_dir)
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# ----------------------------------------------------------------------------- output folder


def test_output_is_a_plain_model_with_the_adapters_chat_template(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_model(tmp_path / "base")
    _fp32(base).to(torch.bfloat16).save_pretrained(str(base))  # a bf16 base: --dtype auto -> bf16
    trained_template = "{# trained #}" + CHATML_TEMPLATE
    tok = make_tokenizer(chat_template=trained_template)
    adapter = make_adapter(
        base, tmp_path / "a", tokenizer=tok, r=4, lora_alpha=8, target_modules=ALL_LINEAR
    )
    result = merge(adapter, tmp_path / "out")  # auto dtype, auto verification
    out = result.out_dir
    assert result.dtype == "bf16" and result.tokenizer_source == adapter
    assert result.verification is not None and result.verification.passed
    assert all(t.dtype == torch.bfloat16 for t in read_weights(out).values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    loaded_tok = AutoTokenizer.from_pretrained(str(out))
    assert loaded_tok.chat_template == trained_template
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = loaded_tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen["eos_token_id"] and 1 in gen["eos_token_id"]
    readme = (out / "README.md").read_text()
    import qorpo

    assert qorpo.__version__ in readme and "base_model:" in readme and "into | original" in readme
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.generation_config.eos_token_id == gen["eos_token_id"]
    ids = prompt_batch(loaded_tok)[0]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_base_resolved_from_the_local_hf_cache(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    make_model(snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    adapter = make_adapter(snapshot, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/tiny"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    result = merge(adapter, tmp_path / "out", verify=False)
    assert result.base == snapshot
    with pytest.raises(MergeError, match="acme/missing"):
        merge(adapter, tmp_path / "out2", base="acme/missing", verify=False)


def test_qorpo_merge_is_callable_from_the_package(tmp_path: Path) -> None:
    import qorpo

    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    result = qorpo.merge(adapter, out=tmp_path / "out", verify=False)  # as in the README
    assert result.out_dir == tmp_path / "out" and qorpo.merge is merge


# ----------------------------------------------------------------------------- CLI


def test_cli_merge_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qorpo.cli import app

    base = make_model(tmp_path / "base", max_shard_size="100KB")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["merge", str(adapter), "--out", str(out), "--no-verify", "--dtype", "fp32"]
    ok = runner.invoke(app, [*args, "--max-shard-size", "100KB"])
    assert ok.exit_code == 0, ok.output
    assert "merged" in ok.output and (out / "model.safetensors.index.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "already exists" in again.output and "Traceback" not in again.output
    bad = runner.invoke(app, [*args, "--force", "--into", "sideways"])
    assert bad.exit_code != 0


# ----------------------------------------------------------------------------- MergeConfig


def test_merge_config_lists_every_problem_at_once() -> None:
    from qorpo.errors import ConfigError
    from qorpo.merging import MergeConfig

    with pytest.raises(ConfigError) as exc:
        MergeConfig.from_dict({"adapter": "runs/x", "dtype": "fp8", "into": "sideways",
                               "method": "fast", "gguf": "q4_0", "max_shard_size": "lots",
                               "max_shard": "1GB"})
    assert "did you mean max_shard_size" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        MergeConfig.from_dict({"adapter": "runs/x", "dtype": "fp8", "into": "sideways",
                               "method": "fast", "gguf": "q4_0", "max_shard_size": "lots"})
    named = sorted(p.split(":")[0] for p in exc.value.problems)
    assert named == ["dtype", "gguf", "into", "max_shard_size", "method", "out"]


def test_merge_takes_a_config_object_like_its_keywords(tmp_path: Path) -> None:
    from qorpo.merging import MergeConfig

    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = MergeConfig(adapter=str(adapter), out=str(tmp_path / "cfg"), dtype="fp32",
                         verify=False, max_shard_size="100KB")
    by_config = merge(config)
    by_keywords = merge(adapter, tmp_path / "kw", dtype="fp32", verify=False,
                        max_shard_size=100_000)
    overridden = merge(config, out=tmp_path / "other", max_shard_size="5GB")
    assert by_config.weight_files == by_keywords.weight_files and len(by_config.weight_files) > 1
    assert overridden.out_dir == tmp_path / "other" and len(overridden.weight_files) == 1
    for name in by_config.weight_files:
        assert load_file(str(by_config.out_dir / name)).keys() == load_file(
            str(by_keywords.out_dir / name)).keys()


def test_gguf_choices_are_the_exporters() -> None:
    from qorpo.export.hparams import OUT_TYPES
    from qorpo.merging.options import GGUF_TYPES

    assert tuple(OUT_TYPES) == GGUF_TYPES

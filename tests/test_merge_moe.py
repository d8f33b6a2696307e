"""Mixture-of-experts adapters (peft target_parameters on 3-D expert tensors) merge by default.

peft's ``all-linear`` (qorpo's default targets) on a transformers-5 MoE model trains the fused
expert parameters and the router through ``lora.ParamWrapper``; the checkpoint on disk keeps one
2-D tensor per expert. The streaming merge must equal peft's own ``merge_and_unload()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from qorpo.errors import MergeError
from qorpo.merging import merge
from tests.tiny import make_tokenizer

IDS = torch.tensor([[5, 17, 33, 60, 2, 90, 120, 7, 44, 301]])
COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0,
              eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def moe_model(family: str, **overrides: Any) -> Any:
    """A tiny random Qwen3-MoE or Mixtral (4 experts, 2 per token) with non-trivial weights."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    if family == "qwen3_moe":
        sizes = {"moe_intermediate_size": 32, **overrides}
        cfg = Qwen3MoeConfig(**COMMON, **sizes, intermediate_size=128, num_experts=4,
                             num_experts_per_tok=2, head_dim=16)
    else:
        cfg = MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                            num_experts_per_tok=2, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model


def save_base(model: Any, out: Path, *, fused: bool = False) -> Path:
    """save_pretrained writes transformers' saved layout (one tensor per expert); ``fused``
    writes the in-memory 3-D expert tensors as they are (a checkpoint already in v5 layout)."""
    if fused:
        out.mkdir(parents=True)
        model.config.save_pretrained(str(out))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(str(out))
    make_tokenizer(out)
    return out


def make_moe_adapter(base: Path, out: Path) -> Path:
    """The LoraConfig qorpo's add_lora builds (all-linear), with non-zero B (real deltas)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                      init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(str(out))
    return out


def peft_reference(base: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _loaded(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_moe_adapter_merges_with_defaults_like_peft(
    tmp_path: Path, family: str, layout: str
) -> None:
    base = save_base(moe_model(family), tmp_path / "base", fused=layout == "fused")
    adapter = make_moe_adapter(base, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "gate_up_proj" in config["target_parameters"]  # what used to stop the merge

    result = merge(adapter, tmp_path / "merged", dtype="fp32")  # defaults: stream, verify auto
    assert result.method == "stream"
    assert result.verification is not None and result.verification.passed
    # 2 layers x (q, k, v, o + router + 2 expert stacks)
    assert result.merged_modules == 2 * 7

    reference = peft_reference(base, adapter)
    merged = _loaded(tmp_path / "merged")
    with torch.no_grad():
        want = reference(IDS).logits
        with reference.disable_adapter():
            plain = reference(IDS).logits
        got = merged(IDS).logits
    assert (plain - want).abs().max() > 1e-3  # the adapter changes the model
    assert (got - want).abs().max() <= 1e-5
    merged_by_peft = reference.merge_and_unload().state_dict()
    mine = merged.state_dict()
    assert mine.keys() == merged_by_peft.keys()
    for key, value in merged_by_peft.items():
        assert (mine[key] - value).abs().max() <= 1e-5, key


def test_expert_tensors_on_disk_are_per_expert_and_all_change(tmp_path: Path) -> None:
    """The merged files keep the saved layout, and every expert's tensors moved by the delta."""
    base = save_base(moe_model("mixtral"), tmp_path / "base")
    adapter = make_moe_adapter(base, tmp_path / "adapter")
    merge(adapter, tmp_path / "merged", dtype="fp32", verify=False)
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert before.keys() == after.keys()
    experts = [k for k in before if ".experts." in k]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (w1, w2, w3)
    for key in experts + [k for k in before if k.endswith("block_sparse_moe.gate.weight")]:
        assert not torch.equal(before[key], after[key]), key
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])


def test_moe_adapter_on_another_base_names_the_module(tmp_path: Path) -> None:
    base = save_base(moe_model("qwen3_moe"), tmp_path / "base")
    adapter = make_moe_adapter(base, tmp_path / "adapter")
    # same names, other expert shapes
    other = save_base(moe_model("qwen3_moe", moe_intermediate_size=48), tmp_path / "other")
    with pytest.raises(MergeError) as exc:
        merge(adapter, tmp_path / "merged", base=other)
    assert "experts" in str(exc.value)
    assert not (tmp_path / "merged").exists()


def test_qorpo_trained_moe_adapter_merges_with_defaults(tmp_path: Path) -> None:
    """qorpo train (4-bit, 2 steps) -> qorpo merge with default options (~13 s)."""
    from qorpo.api import train
    from tests.test_train import base_kwargs, write_pairs

    base = save_base(moe_model("qwen3_moe"), tmp_path / "base")
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    # the default LoRA dropout: peft's ParamWrapper (the expert parameters) takes none, so the
    # run trains without it and says so, instead of stopping
    console = Console(record=True, width=200)
    train(console=console, **base_kwargs(base, data, tmp_path / "run", max_steps=2,
                                         lora_dropout=0.05))
    assert "LoRA dropout 0 instead of 0.05" in console.export_text()
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert "gate_up_proj" in config["target_parameters"]

    result = merge(tmp_path / "run", tmp_path / "merged")  # defaults: stream, verified
    assert result.method == "stream" and result.merged_modules == 2 * 7
    report = result.verification
    assert report is not None and report.passed
    assert report.adapter_effect is not None and report.adapter_effect.max_abs > 1e-4

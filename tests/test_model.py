"""Model side: parity check across architectures, dtype choice, 4-bit gradients on the CPU."""

from __future__ import annotations

import pytest
import torch

from qorpo.config import TrainConfig
from qorpo.errors import ConfigError
from qorpo.forward import parity_check
from qorpo.loss import OutputHead
from qorpo.model import (
    ModelError,
    add_lora,
    choose_dtype,
    final_hidden_states,
    load_base_model,
    output_head,
)
from tests.tiny import make_model

CPU = torch.device("cpu")


def load(path, quant="4bit", dtype=torch.float32):
    cfg = TrainConfig(model=str(path), quant=quant)
    model = load_base_model(cfg, dtype, CPU)
    return add_lora(model, cfg, dtype)


def test_16bit_qlora_generates_outside_the_trainer(tmp_path):
    """The demo's before/after replies run outside the Trainer's autocast: a bf16 QLoRA model
    (fp32 norms, bf16 head) must still generate, with the adapter on and off."""
    from transformers import AutoTokenizer

    from qorpo.api import generate

    path = make_model(tmp_path / "m", arch="llama")
    model = load(path, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for adapter in (False, True):
        assert isinstance(generate(model, tokenizer, "hello there", adapter=adapter), str)


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_16bit_qlora_layout_probe_allows_for_16bit_compute(tmp_path, layout):
    """A bf16 QLoRA model's final norm is fp32, so its hidden states come out fp32 while every
    matmul ran in bf16. The layout probe's tolerance must follow the compute dtype: judged as
    fp32 (1e-4), the packed layout's bf16 rounding (~4e-3) switched every GPU-default run
    (bf16, NF4) back to the padded layout."""
    from qorpo.forward import compute_dtype, probe_layout

    path = make_model(tmp_path / "m", arch="llama")
    model = load(path, dtype=torch.bfloat16)
    assert compute_dtype(model) == torch.bfloat16
    err, tol = probe_layout(model, layout)
    assert tol == 3e-2 and err <= tol
    fp32 = load(path, dtype=torch.float32)
    assert compute_dtype(fp32) == torch.float32
    err32, tol32 = probe_layout(fp32, layout)
    assert tol32 == 1e-4 and err32 <= tol32


def tokens(vocab=320, rows=2, t=11):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (rows, t), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding on one row
    return ids, mask


PAIRS = [([5, 6, 7], [8, 9], [10, 11, 12, 13]), ([14], [15, 16, 17], [18]),
         ([19, 20, 21, 22, 23, 24], [25], [26, 27])]  # odd lengths, a one-token prompt


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("layout", ["padded", "shared", "packed"])
def test_parity_check_passes(tmp_path, arch, tie, layout):
    model = load(make_model(tmp_path / "m", arch=arch, tie=tie))
    report = parity_check(model, PAIRS, layout, 2, torch.float32)
    # every token but each chosen sequence's first, and every rejected response token, of the
    # pairs it checks (the first PARITY_PAIRS, each part cut to PARITY_TOKENS)
    from qorpo.forward import PARITY_PAIRS

    want = sum(len(p) + len(c) - 1 + len(r) for p, c, r in PAIRS[:PARITY_PAIRS])
    assert report.max_abs_diff <= 1e-4 and report.tokens == want
    assert report.layout_diff <= 1e-4


def test_parity_check_fails_loudly_for_a_head_it_cannot_reproduce(tmp_path, monkeypatch):
    model = load(make_model(tmp_path / "m", arch="llama"))
    import qorpo.forward as qf

    real = qf.output_head
    # a model whose logits are soft-capped in a way the head description does not say
    monkeypatch.setattr(qf, "output_head", lambda m: real(m)._replace(softcap=0.5))
    with pytest.raises(ModelError, match="LlamaForCausalLM: parity check failed"):
        parity_check(model, PAIRS, "padded", 2, torch.float32)


def test_parity_check_catches_a_layout_the_model_does_not_take(tmp_path, monkeypatch):
    model = load(make_model(tmp_path / "m", arch="llama"))
    import qorpo.forward as qf

    # a model that drops custom masks: the shared row then lets rejected tokens see chosen ones
    monkeypatch.setattr(qf, "model_attention_mask", lambda m, b: b.attention_mask()
                        if b.layout == "padded" else None)
    with pytest.raises(ModelError, match="shared layout scores pairs differently"):
        parity_check(model, PAIRS, "shared", 2, torch.float32)


def test_output_head_reads_softcap_and_scaling(tmp_path):
    path = make_model(tmp_path / "m", arch="llama", final_logit_softcapping=30.0,
                      logits_scaling=4.0)
    head = output_head(load(path))
    assert isinstance(head, OutputHead)
    assert head.softcap == 30.0 and head.logit_scale == pytest.approx(0.25)


def test_dtype_choice_on_cpu_is_fp32():
    choice = choose_dtype("auto", CPU)
    assert choice.dtype == torch.float32 and "CPU" in choice.reason
    assert choose_dtype("bf16", CPU).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="--dtype fp16 trains only on a CUDA GPU"):
        choose_dtype("fp16", CPU)  # the Trainer has no fp16 autocast there: it would crash


def test_lora_targets_all_linear_but_head(tmp_path):
    model = load(make_model(tmp_path / "m", arch="llama"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in names) and any("down_proj.lora_B" in n
                                                             for n in names)
    assert not any("lm_head" in n for n in names)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.__class__.__name__ \
        == "Linear4bit"


def test_4bit_gradients_survive_an_eval_pass(tmp_path):
    """bitsandbytes repacks CPU 4-bit weights in eval mode into a kernel without autograd;
    gradients to lower LoRA layers must be the same whether or not an eval pass came first."""
    path = make_model(tmp_path / "m", arch="llama")
    ids, mask = tokens()

    def lower_layer_grad(eval_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = load(path)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # make the LoRA path non-trivial
        if eval_first:
            parity_check(model, PAIRS, "padded", 2, torch.float32)  # eval mode, no grad
        model.train()
        final_hidden_states(model, ids, mask).pow(2).mean().backward()
        layer0 = model.base_model.model.model.layers[0].self_attn.q_proj
        return layer0.lora_A["default"].weight.grad.clone()

    fresh, after_eval = lower_layer_grad(False), lower_layer_grad(True)
    scale = fresh.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(after_eval / scale, fresh / scale, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native_bf16,expected", [(False, torch.float16), (True, torch.bfloat16)])
def test_dtype_choice_on_gpus(monkeypatch, native_bf16, expected):
    """A T4 reports emulated bf16 as supported; qorpo must still pick fp16 there."""
    import qorpo.model as qm

    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return True if including_emulation else native_bf16  # what a T4 / an A100 answers

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    choice = qm.choose_dtype("auto", torch.device("cuda", 0))
    assert choice.dtype == expected and calls == [False]
    if not native_bf16:
        assert "fp16 compute" in choice.reason
        with pytest.raises(ModelError, match="no bf16"):
            qm.choose_dtype("bf16", torch.device("cuda", 0))


def test_fsdp_settings_store_4bit_weights_in_the_compute_dtype(tmp_path, monkeypatch):
    """Under FSDP (accelerate sets ACCELERATE_USE_FSDP), every parameter of the model is in the
    compute dtype (FSDP flattens a unit into one tensor of one dtype), and storing the packed
    4-bit weights as bf16 instead of uint8 changes no weight the model computes with."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    path = make_model(tmp_path / "m", arch="llama")

    def load_with(fsdp: bool) -> tuple[dict[str, torch.Tensor], set]:
        with monkeypatch.context() as m:
            if fsdp:
                m.setenv("ACCELERATE_USE_FSDP", "true")
            else:
                m.delenv("ACCELERATE_USE_FSDP", raising=False)
            cfg = TrainConfig(model=str(path))
            model = add_lora(load_base_model(cfg, torch.bfloat16, CPU), cfg, torch.bfloat16)
        weights = {n: bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                   for n, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
        return weights, {p.dtype for p in model.parameters()}

    plain, plain_dtypes = load_with(False)
    sharded, fsdp_dtypes = load_with(True)
    assert fsdp_dtypes == {torch.bfloat16}
    assert torch.uint8 in plain_dtypes and torch.float32 in plain_dtypes  # the usual mix
    assert plain.keys() == sharded.keys() and len(plain) == 14
    for name in plain:
        assert torch.equal(plain[name], sharded[name]), name


def test_parity_check_looks_at_short_pieces_of_long_pairs(tmp_path, monkeypatch):
    """The check must not build (rows, 512, vocab) logits: it cuts each part of each pair."""
    import qorpo.forward as qf

    model = load(make_model(tmp_path / "m", arch="llama"))
    long = [(list(range(5, 305)), list(range(5, 205)), list(range(7, 207)))] * 3
    seen = []
    real = qf.build_batch
    monkeypatch.setattr(qf, "build_batch", lambda p, *a, **k: seen.append(p) or real(p, *a, **k))
    report = parity_check(model, long, "packed", 2, torch.float32)
    assert all(len(pairs) == qf.PARITY_PAIRS for pairs in seen)
    assert all(len(part) <= qf.PARITY_TOKENS for pairs in seen for pair in pairs
               for part in pair)
    assert report.tokens == qf.PARITY_PAIRS * (3 * qf.PARITY_TOKENS - 1)


def test_no_parameter_keeps_the_checkpoint_file_mapped(tmp_path):
    """A CPU load in the checkpoint's own dtype is zero-copy: embedding and norms would stay
    views of the safetensors mmap, keeping the whole file resident (qorpo.sysmem)."""
    import gc

    from qorpo.sysmem import _mapped_files

    path = make_model(tmp_path / "m", arch="llama")
    model = load(path)
    gc.collect()
    ranges = _mapped_files()
    assert not any(lo <= p.untyped_storage().data_ptr() < hi
                   for lo, hi in ranges for p in model.parameters())
    with open("/proc/self/maps") as fh:
        assert str(path / "model.safetensors") not in fh.read()

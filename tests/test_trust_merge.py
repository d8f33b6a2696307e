"""Merges you can trust (issue 18): no custom code run unasked, no merge onto another
architecture, --force replaces only a merge, damaged inputs and a full disk said in one line,
the weak-check note, and how far the merged model is from the trained one."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.text import Text
from typer.testing import CliRunner

from qorpo.cli import app
from qorpo.errors import MergeError
from qorpo.merging import merge
from qorpo.merging import shards as shards_module
from qorpo.merging.shards import MARKER
from tests.test_merge import ALL_LINEAR, make_adapter
from tests.tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
TEMP = ".*.tmp-*"  # qorpo.atomic's temp names


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def qorpo_process(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> Any:
    """The real CLI in a fresh process, with ``stdin`` (e.g. "y\\n" for a prompt)."""
    code = ("import sys\nfrom qorpo.cli import main\n"
            f"sys.argv = ['qorpo', *{list(args)!r}]\nmain()\n")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True,
                          text=True, env=full_env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny Llama base, an adapter on it (non-zero B), and the root folder."""
    root = tmp_path_factory.mktemp("trust_merge")
    base = make_model(root / "base")
    adapter = make_adapter(base, root / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    return root, base, adapter


# ----------------------------------------------------------------------------- 4. custom code
EVIL = '''
from pathlib import Path
Path({sentinel!r}).write_text("the base's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil_llama"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def evil_base(root: Path, *, model_type: str = "evil_llama") -> tuple[Path, Path, Path]:
    """A base whose config.json auto_map points to a .py in the folder that writes a sentinel
    file when imported; an adapter trained on its weights. Returns base, adapter, sentinel."""
    base = make_model(root / "evil")
    adapter = make_adapter(base, root / "evil_adapter", r=2, lora_alpha=4,
                           target_modules=["q_proj"])
    sentinel = root / "SENTINEL"
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(cfg))
    (base / "modeling_evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    return base, adapter, sentinel


def test_4_custom_code_base_never_prompts_and_is_refused(tmp_path: Path) -> None:
    base, adapter, sentinel = evil_base(tmp_path)
    out = tmp_path / "out"
    # "y" on stdin is what transformers' [y/N] prompt would take as consent
    done = qorpo_process("merge", str(adapter), "--out", str(out), "--verify", stdin="y\n")
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert "needs custom code" in text and "auto_map" in text and "AutoConfig" in text
    assert str(base) in text and "--trust-remote-code" in text
    assert "Traceback" not in text and "[y/N]" not in text
    assert not sentinel.exists()  # no code of the base ran
    assert not out.exists() and not list(tmp_path.glob(TEMP))


def test_4_custom_code_refused_by_the_api_and_run_only_with_the_flag(tmp_path: Path) -> None:
    base, adapter, sentinel = evil_base(tmp_path)
    with pytest.raises(MergeError, match=r"config\.json needs custom code.*--trust-remote-code"):
        merge(adapter, tmp_path / "out", verify=True)
    assert not sentinel.exists() and not (tmp_path / "out").exists()
    # asked for: the code runs, the merged folder carries it and loads (verified with it)
    done = qorpo_process("merge", str(adapter), "--out", str(tmp_path / "out"), "--verify",
                         "--trust-remote-code",
                         env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert sentinel.exists() and (tmp_path / "out" / "modeling_evil.py").is_file()
    assert "ran the custom code" in done.stdout and "verified vs" in done.stdout


def test_4_custom_tokenizer_code_refused(tmp_path: Path, pair) -> None:
    _, base, adapter = pair
    tok_adapter = shutil.copytree(adapter, tmp_path / "a")
    (tok_adapter / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer",
         "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    with pytest.raises(MergeError, match=r"tokenizer_config\.json needs custom code.*"
                                         r"AutoTokenizer.*--trust-remote-code"):
        merge(tok_adapter, tmp_path / "out", base=base, verify=False)
    assert not (tmp_path / "out").exists()


def test_4_builtin_model_type_with_auto_map_uses_transformers_code(tmp_path: Path) -> None:
    """auto_map next to a model_type transformers knows: the built-in class is used, nothing
    of the folder runs, and the merge says so."""
    _, adapter, sentinel = evil_base(tmp_path, model_type="llama")
    result = merge(adapter, tmp_path / "out", verify=True)
    assert not sentinel.exists()
    assert any("auto_map" in n and "not run" in n for n in result.notes)
    assert result.verification is not None and result.verification.passed


def test_4_help_lists_trust_remote_code() -> None:
    result = CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--trust-remote-code" in result.output


# ----------------------------------------------------------------------------- 8. architecture
@pytest.fixture(scope="module")
def llama_qwen(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny Llama and a tiny Qwen2 of identical shapes; an adapter trained on the Llama."""
    root = tmp_path_factory.mktemp("arch")
    llama = make_model(root / "llama", arch="llama")
    qwen = make_model(root / "qwen2", arch="qwen2")
    adapter = make_adapter(llama, root / "run", r=2, lora_alpha=4, target_modules=ALL_LINEAR)
    return llama, qwen, adapter


def _adapter_copy(src: Path, dst: Path, **config: Any) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def test_8_other_architecture_refused_from_the_run_file(tmp_path: Path, llama_qwen) -> None:
    llama, qwen, trained = llama_qwen
    run = _adapter_copy(trained, tmp_path / "run", base_model_name_or_path="gone/nowhere")
    (run / "qorpo_run.json").write_text(json.dumps({"finished": True, "base_model": {
        "name_or_path": str(llama), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}}))
    with pytest.raises(MergeError, match=r"trained on a llama \(LlamaForCausalLM\).*qorpo_run"
                                         r"\.json.*is a qwen2 \(Qwen2ForCausalLM\)"):
        merge(run, tmp_path / "out", base=qwen, verify=True)
    assert not (tmp_path / "out").exists()
    # a checkpoint-N folder of that run uses the run's record
    ckpt = _adapter_copy(trained, run / "checkpoint-2", base_model_name_or_path="gone/nowhere")
    result = cli("merge", str(ckpt), "--out", str(tmp_path / "out"), "--base", str(qwen))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "llama" in result.output and "qwen2" in result.output
    # the base it was trained on still merges
    assert merge(run, tmp_path / "ok", base=llama, verify=False).merged_modules > 0


def test_8_other_architecture_refused_from_the_adapters_base(tmp_path: Path, llama_qwen) -> None:
    llama, qwen, trained = llama_qwen  # peft wrote base_model_name_or_path = the llama folder
    assert json.loads((trained / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(llama)
    with pytest.raises(MergeError, match=r"llama.*base_model_name_or_path.*qwen2"):
        merge(trained, tmp_path / "out", base=qwen, verify=False)
    # only peft's auto_mapping left
    peft_only = _adapter_copy(trained, tmp_path / "p", base_model_name_or_path="gone/nowhere",
                              auto_mapping={"base_model_class": "LlamaForCausalLM",
                                            "parent_library": "transformers"})
    with pytest.raises(MergeError, match=r"LlamaForCausalLM.*auto_mapping.*Qwen2ForCausalLM"):
        merge(peft_only, tmp_path / "out", base=qwen, verify=False)
    # nothing says what it was trained on: merges as before
    unknown = _adapter_copy(trained, tmp_path / "u", base_model_name_or_path="gone/nowhere",
                            auto_mapping=None)
    assert merge(unknown, tmp_path / "out", base=qwen, verify=False).merged_modules > 0


# ----------------------------------------------------------------------------- 20. --force
def test_20_force_replaces_only_an_earlier_merge(tmp_path: Path, pair) -> None:
    _, _, adapter = pair
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MergeError, match=f"not one.*no {MARKER}"):
        merge(adapter, mine, verify=False, force=True)
    result = cli("merge", str(adapter), "--out", str(mine), "--force", "--no-verify")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "src").is_dir()

    out = tmp_path / "out"
    first = merge(adapter, out, verify=False)
    marker = json.loads((out / MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER}
    assert marker["adapter"] == str(adapter) and first.notes == ()
    again = cli("merge", str(adapter), "--out", str(out), "--force", "--no-verify")
    assert again.exit_code == 0, again.output
    assert "replaced the earlier merge" in " ".join(again.output.split())
    (out / "eval.md").write_text("my results")  # the user's file in a merged folder
    with pytest.raises(MergeError, match=r"files the earlier merge did not write \(eval\.md\)"):
        merge(adapter, out, verify=False, force=True)
    assert (out / "eval.md").read_text() == "my results"


def test_20_gguf_exported_later_belongs_to_the_merge(tmp_path: Path, pair) -> None:
    from qorpo.export import export_gguf

    _, _, adapter = pair
    out = tmp_path / "out"
    merge(adapter, out, verify=False)
    export_gguf(out, out_type="f16", verify=False)
    assert "out-f16.gguf" in json.loads((out / MARKER).read_text())["files"]
    merge(adapter, out, verify=False, force=True)
    assert not (out / "out-f16.gguf").exists()


# ----------------------------------------------------------------------------- 6. damaged, full
def test_6_truncated_adapter_file_is_named(tmp_path: Path, pair) -> None:
    _, base, adapter = pair
    cut = _adapter_copy(adapter, tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for method in ("stream", "full"):
        with pytest.raises(MergeError, match=r"adapter_model\.safetensors cannot be read.*cut"):
            merge(cut, tmp_path / "out", method=method, verify=False)
    result = cli("merge", str(cut), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "adapter_model.safetensors" in result.output and not (tmp_path / "out").exists()
    (cut / "adapter_config.json").write_text('{"r": 2, ')  # cut short too
    with pytest.raises(MergeError, match=r"adapter_config\.json"):
        merge(cut, tmp_path / "out", verify=False)


def test_6_truncated_base_shard_is_named_before_writing(tmp_path: Path, pair) -> None:
    _, base, adapter = pair
    cut = shutil.copytree(base, tmp_path / "base")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(MergeError, match=r"model\.safetensors cannot be read.*cut short"):
        merge(adapter, tmp_path / "out", base=cut, verify=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(TEMP))


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (the disk filling
    up mid-shard)."""

    def __init__(self, fh: Any, room: int) -> None:
        self._fh, self._room = fh, room

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= size
        return self._fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def test_6_disk_full_while_writing_shards(tmp_path: Path, pair, monkeypatch) -> None:
    _, _, adapter = pair
    out = tmp_path / "out"
    merge(adapter, out, verify=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(shards_module, "open",
                        lambda *a, **k: _FullDisk(open(*a, **k), 100_000), raising=False)
    with pytest.raises(MergeError) as err:
        merge(adapter, out, verify=False, force=True)
    message = str(err.value)
    assert "disk filled up" in message and str(out) in message and " MB (" in message
    assert "bytes" in message and message.count(". ") == 0  # one sentence
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier one intact
    assert not list(tmp_path.glob(TEMP))
    result = cli("merge", str(adapter), "--out", str(tmp_path / "new"), "--no-verify")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "disk filled up" in result.output and not (tmp_path / "new").exists()


def test_6_disk_full_in_the_full_method(tmp_path: Path, pair, monkeypatch) -> None:
    """transformers' save_pretrained writes through safetensors, which reports a full disk as
    its own error type ("... (os error 28)"), not an OSError."""
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    _, _, adapter = pair

    def full(*a: Any, **k: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    with pytest.raises(MergeError, match=r"disk filled up while writing the merged model to"):
        merge(adapter, tmp_path / "out", method="full", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_6_disk_full_while_writing_a_gguf(tmp_path: Path, pair, monkeypatch) -> None:
    import gguf

    from qorpo.export import export_gguf

    _, _, adapter = pair
    merged = merge(adapter, tmp_path / "m", verify=False).out_dir
    first = export_gguf(merged, tmp_path / "g", out_type="f16", verify=False).path
    before = first.read_bytes()

    def full(self: Any, *a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(MergeError, match=r"disk filled up while writing the GGUF file to .*"
                                         r"m-f16\.gguf: it needs about .* MB"):
        export_gguf(merged, tmp_path / "g", out_type="f16", verify=False, force=True)
    assert first.read_bytes() == before and not list((tmp_path / "g").glob(TEMP))
    with pytest.raises(MergeError, match=r"disk filled up while writing the merged model to"):
        merge(adapter, tmp_path / "both", gguf="f16", verify=False)
    assert not (tmp_path / "both").exists() and not list(tmp_path.glob(TEMP))


# ----------------------------------------------------------------------------- 21. --out
def test_21_out_under_a_file_is_refused_before_any_work(tmp_path: Path, pair) -> None:
    _, _, adapter = pair
    (tmp_path / "afile").write_text("x")
    # the base does not even exist: the --out problem is found first
    result = cli("merge", str(adapter), "--out", str(tmp_path / "afile" / "x"),
                 "--base", str(tmp_path / "no-such-base"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "afile is a file" in " ".join(result.output.split())
    with pytest.raises(MergeError, match="is a file"):
        merge(adapter, tmp_path / "afile", verify=False, force=True)


# ----------------------------------------------------------------------------- 19. weak check
def test_19_untrained_adapter_says_the_check_is_weak(tmp_path: Path, pair) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, base, _ = pair
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "untrained"))  # peft's default init: B = 0, as after 0 effective steps
    result = merge(tmp_path / "untrained", tmp_path / "out", verify=True)
    assert result.verification is not None and result.verification.adapter_effect.max_abs == 0
    assert any("weak check" in w and "adapter effect 0" in w for w in result.warnings)
    shown = cli("merge", str(tmp_path / "untrained"), "--out", str(tmp_path / "o2"), "--verify")
    assert shown.exit_code == 0 and "weak check" in " ".join(shown.output.split())


# ----------------------------------------------------------------------------- 14. quoting
def test_14_printed_merge_command_is_quoted(tmp_path: Path) -> None:
    from qorpo.progress import summary_table

    out_dir = tmp_path / "my runs" / "it's [v1]"
    caption = Text.from_markup(str(summary_table(out_dir, {}, {}, []).caption)).plain
    line = next(x for x in caption.splitlines() if "qorpo merge" in x)
    words = shlex.split(line.split("merge:", 1)[1])
    assert words == ["qorpo", "merge", str(out_dir), "--out", f"{out_dir}-merged"]


# ----------------------------------------------------------------------------- merge target
def test_summary_says_how_far_each_target_is_from_the_4bit_model(tmp_path: Path, pair) -> None:
    _, base, _ = pair
    adapter = make_adapter(base, tmp_path / "run", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    (adapter / "qorpo_config.yaml").write_text("quant: 4bit\n")
    original = merge(adapter, tmp_path / "orig", verify=True)
    report = original.verification
    assert report is not None and report.other_gap is not None
    sentence = next(s for s in (*original.notes, *original.warnings) if "--into original" in s)
    assert f"{report.other_gap.max_abs:.3g}" in sentence
    assert "the 4-bit model you trained" in sentence and "--into dequantized keeps" in sentence
    # tiny random model: the NF4 rounding moves the greedy tokens a lot -> a warning
    assert report.other_gap.agreement < 0.9 and sentence in original.warnings
    deq = merge(adapter, tmp_path / "deq", into="dequantized", verify=True)
    sentence = next(s for s in deq.notes if "--into dequantized" in s)
    assert "greedy agreement 100.0%" in sentence and "--into original gives" in sentence
    assert not deq.warnings
    shown = cli("merge", str(adapter), "--out", str(tmp_path / "o3"), "--verify")
    assert shown.exit_code == 0 and "warning:" in shown.output
    assert "--into dequantized keeps exactly" in " ".join(shown.output.split())


def test_no_traceback_for_a_base_folder_without_config(tmp_path: Path, pair) -> None:
    _, _, adapter = pair
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="no config.json"):
        merge(adapter, tmp_path / "out", base=tmp_path / "empty", verify=False)


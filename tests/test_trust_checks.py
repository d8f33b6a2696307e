"""Validation and pre-load checks (issue #18, items 6, 12, 14, 21): every case of the sweep that
ended in a traceback, a silent no-op or a message blaming the wrong option. Each test first
reproduces the sweep's command, then checks the rule behind it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qorpo.cli import app
from qorpo.config import TrainConfig, parse_memory_size
from qorpo.errors import ConfigError, ModelError
from tests.test_train import write_pairs
from tests.tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max-length", "48", "--min-response-tokens", "2", "--max-steps", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    return root, make_model(root / "llama", arch="llama"), write_pairs(root / "pairs.jsonl", 8)


def train_cli(model: Path, data: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["train", "--model", str(model), "--data", str(data),
                                    "--output-dir", str(out), *SHORT, *args])


def refused(result, code: int) -> str:
    """The CLI's output, after checking it is a one-line refusal with `code`, not a crash."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    return result.output


def no_weights_load(monkeypatch) -> None:
    """A refusal must come before the model's weights load."""
    import qorpo.model

    def fail(*args, **kwargs):
        raise AssertionError("the weights were loaded before the check")

    monkeypatch.setattr(qorpo.model, "load_base_model", fail)


# ----------------------------------------------------------------------------- 6. --seed -1
def test_6_negative_seed_is_a_config_error(work, monkeypatch):
    root, model, data = work
    no_weights_load(monkeypatch)
    out = refused(train_cli(model, data, root / "seed", "--seed", "-1"), 2)
    assert "seed: must be in 0 .. 4294967295, got -1" in out
    with pytest.raises(ConfigError, match="seed: must be in"):
        TrainConfig.from_dict({"seed": 2**32})
    for ok in (0, 2**32 - 1):
        assert TrainConfig.from_dict({"seed": ok}).seed == ok
    # listed with the other problems, not alone
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict({"seed": -1, "lora_r": 0})
    assert len(exc.value.problems) == 2


# ----------------------------------------------------------------------------- 6. custom code
def custom_code_model(root: Path, model: Path, *, in_tokenizer: bool = False) -> Path:
    """A copy of `model` whose config (or tokenizer config) names its own code; the code writes
    SENTINEL next to itself when imported, so a test can tell whether it ran."""
    folder = root / ("custom_tok" if in_tokenizer else "custom")
    shutil.copytree(model, folder)
    # (an absolute path: transformers imports the code from a copy in its modules cache)
    sentinel = f'import pathlib\n\npathlib.Path({str(folder / "SENTINEL")!r}).write_text("ran")\n'
    (folder / "configuration_custom.py").write_text(
        sentinel + "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    (folder / "modeling_custom.py").write_text(
        sentinel + "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    (folder / "tokenization_custom.py").write_text(
        sentinel + "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    if in_tokenizer:
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        tok_cfg["tokenizer_class"] = "CustomTokenizer"
        tok_cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                   auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                             "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def run_qorpo(root: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qorpo", *args], input=stdin, text=True,
                          capture_output=True, cwd=root, env=env, timeout=600)


@pytest.mark.parametrize("in_tokenizer", [False, True], ids=["config", "tokenizer"])
def test_6_custom_code_is_refused_without_the_flag_and_never_run(work, in_tokenizer):
    root, model, data = work
    custom = custom_code_model(root, model, in_tokenizer=in_tokenizer)
    # the sweep's case: a user answers "y" to a prompt that must not appear
    res = run_qorpo(root, "train", "--model", str(custom), "--data", str(data), "--output-dir",
                    str(root / f"out_custom_{in_tokenizer}"), *SHORT, stdin="y\ny\n")
    text = res.stdout + res.stderr
    assert res.returncode == 1, text
    assert "Traceback" not in text and "[y/N]" not in text
    assert "--trust-remote-code" in text and str(custom.name) in text
    assert not (custom / "SENTINEL").exists()  # its code never ran
    assert not (root / f"out_custom_{in_tokenizer}").exists()  # nothing written
    # control: the sentinel does work (the code runs when the flag is given)
    res = run_qorpo(root, "train", "--model", str(custom), "--data", str(data), "--output-dir",
                    str(root / f"out_trusted_{in_tokenizer}"), *SHORT, "--trust-remote-code",
                    "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (custom / "SENTINEL").exists()


def test_6_custom_code_refusal_in_process_passes_no_none(work, monkeypatch):
    """The refusal is a ModelError from the tokenizer step, and transformers is never given
    trust_remote_code=None (which asks on stdin)."""
    root, model, _ = work
    (root / "inproc").mkdir()
    custom = custom_code_model(root / "inproc", model)
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "missing"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(spy))
    from qorpo.model import load_tokenizer

    with pytest.raises(ModelError, match="ships its own code.*--trust-remote-code"):
        load_tokenizer(TrainConfig(model=str(custom)))
    assert seen == [False]
    assert not (custom / "SENTINEL").exists()
    with pytest.raises(ConfigError, match="trust_remote_code: expected true or false, got None"):
        TrainConfig(model=str(custom), trust_remote_code=None).validate()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- 21. packages
def test_21_bad_optimizer_scheduler_loggers_are_listed_together(work, monkeypatch):
    root, model, data = work
    no_weights_load(monkeypatch)
    real = __import__("importlib").util.find_spec
    missing = {"tensorboard", "tensorboardX", "wandb"}  # as on a machine without them
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name in missing else real(name, *a))
    out = refused(train_cli(model, data, root / "pkgs", "--optim", "bogus", "--lr-scheduler",
                            "bogus", "--report-to", "tensorboard,wandb"), 2)
    flat = " ".join(out.split())
    assert "--optim 'bogus' is not a valid name" in flat and "adamw_torch" in flat
    assert "--lr-scheduler 'bogus' is not a valid name" in flat and "cosine" in flat
    assert "pip install tensorboard" in flat and "pip install wandb" in flat
    assert not (root / "pkgs").exists()


def test_21_check_environment_rules():
    from qorpo.preflight import check_environment

    def problems(**kw) -> list[str]:
        try:
            check_environment(TrainConfig(**kw))
        except ConfigError as exc:
            return exc.problems
        return []

    assert problems() == []
    assert problems(optim="adamw_torch", lr_scheduler="cosine") == []
    assert problems(optim="auto", lr_scheduler="constant_with_warmup") == []
    close = problems(optim="adamw")[0]
    assert "did you mean" in close and "adamw_torch" in close
    assert "optim_target_modules" in problems(optim="galore_adamw")[0]
    assert "min_lr" in problems(lr_scheduler="cosine_with_min_lr")[0]
    assert "num_decay_steps" in problems(lr_scheduler="warmup_stable_decay")[0]
    assert "eval" in problems(lr_scheduler="reduce_lr_on_plateau")[0]
    assert problems(lr_scheduler="reduce_lr_on_plateau", eval_fraction=0.1, eval_steps=5) == []


def test_21_flash_attention_without_its_package_or_gpu(work, monkeypatch):
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX

    from qorpo.model import attn_problems

    root, model, data = work
    # the sweep's case through the CLI: on this CPU, a refusal before anything loads
    no_weights_load(monkeypatch)
    out = refused(train_cli(model, data, root / "fa", "--attn-implementation",
                            "flash_attention_2"), 2)
    assert "flash_attention_2 runs only on a CUDA GPU" in " ".join(out.split())
    cuda = torch.device("cuda")  # the rule on a GPU machine (nothing is run on it)
    monkeypatch.setitem(FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check",
                        lambda: False)
    monkeypatch.setattr("transformers.utils.is_kernels_available", lambda: False)
    [msg] = attn_problems("flash_attention_2", cuda)
    assert "pip install flash-attn" in msg
    monkeypatch.setitem(FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check",
                        lambda: True)
    assert attn_problems("flash_attention_2", cuda) == []
    assert "not an attention implementation" in attn_problems("bogus", cuda)[0]
    for fine in (None, "sdpa", "eager", "kernels-community/flash-attn"):
        assert attn_problems(fine, torch.device("cpu")) == []
    assert "CUDA GPU" in attn_problems("flex_attention", torch.device("cpu"))[0]


# ----------------------------------------------------------------------------- 21. lora targets
@pytest.mark.parametrize("targets", ["q_proj,bogus", "bogus"])
def test_21_lora_target_matching_no_module_is_refused_before_loading(work, monkeypatch,
                                                                     targets):
    root, model, data = work
    no_weights_load(monkeypatch)
    out = " ".join(refused(train_cli(model, data, root / "lt", "--lora-targets", targets),
                           1).split())
    assert "--lora-targets bogus:" in out and "q_proj" not in out.split("bogus:")[0]
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out
    assert not (root / "lt").exists()


def test_21_add_lora_checks_the_loaded_model(work):
    """The check on the real (4-bit) model, which runs even where the meta build cannot."""
    from qorpo.model import add_lora, load_base_model

    _, model, _ = work
    for targets, ok in ((["q_proj", "bogus"], False), (["q_proj", "self_attn.v_proj"], True)):
        cfg = TrainConfig(model=str(model), lora_targets=targets)
        base = load_base_model(cfg, torch.float32, torch.device("cpu"))
        if ok:
            peft_model = add_lora(base, cfg, torch.float32)
            names = {n for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
            assert names and all(".q_proj." in n or ".v_proj." in n for n in names)
        else:
            with pytest.raises(ModelError, match=r"--lora-targets bogus: .*k_proj"):
                add_lora(base, cfg, torch.float32)
    with pytest.raises(ConfigError, match="all-linear already adapts every linear layer"):
        TrainConfig.from_dict({"lora_targets": "all-linear,q_proj"})


# ----------------------------------------------------------------------------- 14. lengths
def test_14_short_max_length_names_both_values_and_the_fix(work, monkeypatch):
    root, model, data = work
    no_weights_load(monkeypatch)
    res = CliRunner().invoke(app, ["train", "--model", str(model), "--data", str(data),
                                   "--output-dir", str(root / "ml"), "--max-length", "8"])
    out = " ".join(refused(res, 2).split())
    assert ("max_length (8) leaves no room for a prompt with min_response_tokens 8: raise "
            "--max-length to at least 15 or lower --min-response-tokens to 4 or less") in out
    assert "min_response_tokens: must leave room" not in out


def _fixes(message: str) -> dict[str, int]:
    found = {}
    for flag, key in (("--max-length", "max_length"), ("--min-response-tokens",
                                                       "min_response_tokens"),
                      ("--max-prompt-length", "max_prompt_length")):
        m = re.search(rf"{flag} to (?:at least )?(\d+)", message)
        if m:
            found[key] = int(m.group(1))
    return found


def test_14_length_rule_is_complete_and_each_fix_works():
    """Valid iff a prompt cut to the (resolved) max_prompt_length leaves min_response_tokens
    (the data step would otherwise cut such prompts and then drop the rows anyway), and every
    fix a message names makes the config valid."""
    for length in range(1, 41):
        for least in range(1, 20):
            for given in (None, *range(1, length + 2, 3)):
                values = {"max_length": length, "min_response_tokens": least,
                          "max_prompt_length": given}
                prompt = given if given is not None else max(1, length // 2)
                try:
                    TrainConfig(**values).validate()
                    valid = True
                except ConfigError as exc:
                    valid, [msg] = False, exc.problems
                assert valid == (prompt < length and least <= length - prompt), values
                if valid or prompt >= length:
                    continue
                fixes = _fixes(msg)
                assert "max_length" in fixes, msg
                for key, value in fixes.items():
                    TrainConfig(**{**values, key: value}).validate()  # each fix alone works
                    short = value - 1 if key == "max_length" else value + 1
                    with pytest.raises(ConfigError):  # and is the least change that does
                        TrainConfig(**{**values, key: short}).validate()


# ----------------------------------------------------------------------------- 12, 7. bounds
def test_12_zero_gpu_memory_is_refused(work, monkeypatch):
    root, model, data = work
    for text in ("0GB", "0", "0.0 MiB"):
        with pytest.raises(ValueError, match="no memory at all"):
            parse_memory_size(text)
    assert parse_memory_size("16GB") == 16 * 2**30
    no_weights_load(monkeypatch)
    out = refused(train_cli(model, data, root / "gm", "--gpu-memory", "0GB"), 2)
    assert "gpu_memory: '0GB' is no memory at all" in out


def test_7_every_count_has_a_bound_that_names_the_option():
    cases = {"max_steps": (0, "max_steps: must be >= 1, or -1"),
             "eval_steps": (0, "eval_steps: must be >= 1"),
             "save_total_limit": (0, "save_total_limit: must be >= 1, got 0 (leave it empty"),
             "logging_steps": (0, "logging_steps: must be >= 1"),
             "max_samples": (0, "max_samples: must be >= 1")}
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict({k: v for k, (v, _) in cases.items()})
    for _, expected in cases.values():
        assert any(p.startswith(expected) for p in exc.value.problems), expected
    with pytest.raises(ConfigError, match="max_steps: must be >= 1, or -1"):
        TrainConfig.from_dict({"max_steps": -2})
    ok = TrainConfig.from_dict({"max_steps": -1, "eval_steps": None, "save_total_limit": None})
    assert (ok.max_steps, ok.eval_steps, ok.save_total_limit) == (-1, None, None)
    assert TrainConfig().validate() == TrainConfig()  # the defaults stay valid


def test_7_wrong_types_from_python_are_config_errors():
    """The API's overrides on a TrainConfig are not parsed: a wrong type is a ConfigError, not
    a TypeError from a comparison (or a None that makes transformers prompt)."""
    from qorpo.api import resolve_config

    with pytest.raises(ConfigError) as exc:
        resolve_config(TrainConfig(), max_length="48", quant=None, lora_alpha=32)
    assert exc.value.problems == ["quant: expected a string, got None",
                                  "max_length: expected an integer, got '48'"]
    assert resolve_config(TrainConfig(), lora_alpha=32).lora_alpha == 32  # an int is a number

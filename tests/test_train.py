"""`qorpo train` end to end on tiny 4-bit models (real bitsandbytes NF4 on the CPU)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qorpo.api import train
from qorpo.cli import app
from qorpo.config import ConfigError, TrainConfig
from tests.tiny import make_model

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "paper", "light"]


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable preference: chosen always answers 'yes, the answer is N.'; rejected rambles
    with random words. A tiny model can learn that within a few steps."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
            f.write(json.dumps({"prompt": f"question {i}: what is {a} + {b}?",
                                "chosen": f"yes, the answer is {a + b}.",
                                "rejected": f"{words} {a} maybe {b}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_model(root / "llama", arch="llama", tie=True)
    data = write_pairs(root / "pairs.jsonl", 48)
    return root, model, data


def base_kwargs(model: Path, data: Path, out: Path, **kw):
    args = dict(model=str(model), data=str(data), output_dir=str(out), max_length=48,
                max_prompt_length=24, min_response_tokens=2, batch_size=2, grad_accum=2,
                logging_steps=1, save_steps=1000, lora_dropout=0.0, learning_rate=5e-3,
                warmup_ratio=0.0, group_by_length=False)
    args.update(kw)
    return args


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- config


def test_config_lists_every_problem_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: 0\nquant: 3bit\nlearning_rat: 0.1\nbeta: -1\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(bad)
    text = str(exc.value)
    assert "learning_rat" in text and "did you mean learning_rate" in text
    bad.write_text("lora_r: 0\nquant: 3bit\nbeta: -1\n")
    with pytest.raises(ConfigError) as exc:
        TrainConfig.load(bad)
    assert len(exc.value.problems) == 3 and "4bit, 8bit, none" in str(exc.value)


def test_flags_override_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lora_r: 8\nbeta: 0.2\nlora_targets: [q_proj, v_proj]\n")
    cfg = TrainConfig.load(y, {"beta": "0.5", "columns": "prompt=question,chosen=good"})
    assert (cfg.lora_r, cfg.beta, cfg.lora_targets) == (8, 0.5, ["q_proj", "v_proj"])
    assert cfg.columns == {"prompt": "question", "chosen": "good"}


# ----------------------------------------------------------------------------- the CLI


def test_cli_train_end_to_end(workdir):
    root, model, data = workdir
    out = root / "cli-out"
    args = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "4", "--max-length", "48", "--max-prompt-length", "24",
            "--min-response-tokens", "2", "--batch-size", "2", "--grad-accum", "1",
            "--logging-steps", "2", "--learning-rate", "5e-3", "--eval-fraction", "0.25"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "format" in result.output and "Parity check passed" in result.output

    # the adapter is standard PEFT: loads with plain peft, no qorpo involved
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    base = AutoModelForCausalLM.from_pretrained(model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, out)
    lora_b = [v for k, v in adapter_weights(out).items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at 0: it trained
    merged = peft_model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the adapter does something
    for f in ("tokenizer.json", "qorpo_config.yaml", "metrics.jsonl"):
        assert (out / f).exists(), f
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickle to deploy
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if "loss" in r]
    assert len(train_logs) == 2
    for key in ("nll", "ratio_loss", "log_odds", "logps/chosen", "logps/rejected",
                "rewards/accuracy", "rewards/margin", "learning_rate", "grad_norm",
                "tokens_per_second"):
        assert key in train_logs[0], key
    assert any("eval_rewards/accuracy" in r for r in logs)
    # the base weights in the base folder were not touched
    assert torch.equal(load_file(str(model / "model.safetensors"))["model.norm.weight"],
                       before["model.norm.weight"])


def test_cli_bad_config_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", "x", "--data", "y", "--quant", "2bit",
                                      "--lora-r", "0"])
    assert result.exit_code == 2
    assert "quant" in result.output and "lora_r" in result.output


def test_dry_run_loads_no_weights(workdir, monkeypatch):
    root, model, data = workdir
    import qorpo.model as qm

    monkeypatch.setattr(qm, "load_base_model", lambda *a, **k: pytest.fail("loaded weights"))
    res = train(**base_kwargs(model, data, root / "dry"), dry_run=True)
    assert res.metrics["steps"] == 12  # 48 pairs / 2 per batch / 2 accum


@pytest.mark.parametrize(("quant", "optim"), [("4bit", "paged_adamw_8bit"),
                                             ("none", "adamw_torch")])
def test_bf16_run_passes_its_start_up_checks_and_trains(workdir, quant, optim, capsys):
    """bf16 (what a GPU run gets by default; emulated on the CPU) mixes dtypes on purpose: fp32
    norms and LoRA weights next to a bf16 embedding and head. The Trainer runs the model under
    autocast; the start-up checks (layout probe, parity check) must too, or the head's matmul
    fails on fp32 hidden states, the layout silently falls back to padded and the parity check
    crashes. The 4-bit case is a GPU run's default configuration (bf16, NF4, 8-bit AdamW — not
    paged on the CPU, bitsandbytes says so — packed), on the CPU."""
    root, model, data = workdir
    out = root / f"bf16-{quant}"
    res = train(**base_kwargs(model, data, out, max_steps=2, dtype="bf16", quant=quant,
                              optim=optim, lora_dropout=0.05, eval_fraction=0.25))
    printed = capsys.readouterr().out
    assert "Parity check passed" in printed and "packed layout scores them" in printed
    assert "prefix sharing off" not in printed  # the probe passed: no fallback to padded
    assert math.isfinite(res.metrics["train_loss"])
    assert math.isfinite(res.eval_before["eval_loss"]) and math.isfinite(res.metrics["eval_loss"])
    weights = adapter_weights(out)
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_learns_a_preference_on_held_out_pairs(workdir):
    root, model, data = workdir
    res = train(**base_kwargs(model, data, root / "learn", max_steps=14, eval_fraction=0.25,
                              learning_rate=1e-2))
    assert res.eval_before["eval_rewards/accuracy"] < 0.9
    assert res.metrics["eval_rewards/accuracy"] >= 0.9
    assert res.metrics["eval_rewards/margin"] > res.eval_before["eval_rewards/margin"]


# ----------------------------------------------------------------------------- exactness


def test_gradient_accumulation_matches_one_big_batch(workdir):
    root, model, data = workdir
    common = dict(max_steps=2, lora_dropout=0.0, optim="sgd", learning_rate=0.5)
    train(**base_kwargs(model, data, root / "ga-big", batch_size=4, grad_accum=1, **common))
    train(**base_kwargs(model, data, root / "ga-acc", batch_size=1, grad_accum=4, **common))
    big, acc = adapter_weights(root / "ga-big"), adapter_weights(root / "ga-acc")
    assert big.keys() == acc.keys()
    for k in big:
        torch.testing.assert_close(acc[k], big[k], atol=1e-6, rtol=1e-5)
    # and the run really moved the weights (else the check above proves nothing)
    assert any(v.abs().sum() > 0 for k, v in big.items() if "lora_B" in k)


def interrupt_at(monkeypatch, step: int, event: str = "on_step_end") -> None:
    """Make the next train() raise KeyboardInterrupt (as Ctrl-C would) at `step`."""
    from transformers import TrainerCallback

    import qorpo.api as qa

    class Interrupt(TrainerCallback):
        pass

    def fire(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise KeyboardInterrupt

    setattr(Interrupt, event, fire)
    real_build = qa.build_trainer

    def build(*a, **k):
        trainer = real_build(*a, **k)
        trainer.add_callback(Interrupt())
        return trainer

    monkeypatch.setattr(qa, "build_trainer", build)


@pytest.mark.slow
def test_resume_gives_identical_adapter(workdir, monkeypatch):
    """N steps straight == interrupted after the checkpoint at N/2, then --resume latest."""
    root, model, data = workdir
    kw = dict(max_steps=6, save_steps=3, lora_dropout=0.1, group_by_length=True)
    train(**base_kwargs(model, data, root / "straight", **kw))
    half = root / "half"
    with monkeypatch.context() as m:
        interrupt_at(m, 3, "on_save")
        with pytest.raises(KeyboardInterrupt):
            train(**base_kwargs(model, data, half, **kw))
    assert (half / "checkpoint-3").is_dir() and not (half / "checkpoint-6").exists()
    train(**base_kwargs(model, data, half, **kw, resume="latest"))
    a, b = adapter_weights(root / "straight"), adapter_weights(half)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- failure modes


def test_non_finite_loss_stops_the_run(workdir, monkeypatch):
    root, model, data = workdir
    import qorpo.trainer as qt

    real = qt.orpo_loss

    def poisoned(logps, **kw):
        out = real(logps, **kw)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(qt, "orpo_loss", poisoned)
    with pytest.raises(qt.NonFiniteLossError, match=r"in step 1, batch rows \[\d+, \d+\]"):
        train(**base_kwargs(model, data, root / "nan", max_steps=2))


def test_ctrl_c_saves_the_adapter(workdir, monkeypatch):
    root, model, data = workdir
    interrupt_at(monkeypatch, 2)
    out = root / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(**base_kwargs(model, data, out, max_steps=10))
    assert (out / "adapter_model.safetensors").exists()
    assert (out / "adapter_config.json").exists()


# ----------------------------------------------------------------------------- layouts
def test_layouts_train_to_the_same_adapter(workdir, monkeypatch):
    """padded, prefix-shared and shared+packed batches: the same pairs in the same steps, the
    same optimisation (10 steps, AdamW), with qorpo.attention's per-pair kernels (CPU)."""
    root, model, data = workdir
    monkeypatch.setattr("qorpo.attention.cost.MIN_ROW_LENGTH", 0)  # the test rows are short
    from qorpo.attention.pairs import pair_attention

    calls = []  # (use_pair_attention registers qorpo.attention.pairs.pair_attention each run)
    monkeypatch.setattr("qorpo.attention.pairs.pair_attention",
                        lambda *a, **k: calls.append(k.get("qorpo_spans") is not None)
                        or pair_attention(*a, **k))
    flags = {"padded": dict(prefix_sharing=False), "shared": dict(packing=False), "packed": {}}
    results = {}
    for layout, kw in flags.items():
        out = root / f"layout-{layout}"
        results[layout] = train(**base_kwargs(model, data, out, max_steps=10, batch_size=4,
                                              grad_accum=1, lora_dropout=0.0, **kw))
    assert any(calls)  # the shared and packed runs went through the per-pair kernels
    ref = adapter_weights(root / "layout-padded")
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)
    for layout in ("shared", "packed"):
        got = adapter_weights(root / f"layout-{layout}")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4)
        logs = {name: [json.loads(line) for line in
                       (root / f"layout-{name}" / "metrics.jsonl").read_text().splitlines()
                       if "loss" in json.loads(line)] for name in ("padded", layout)}
        assert len(logs["padded"]) == 10
        for a, b in zip(logs["padded"], logs[layout], strict=True):
            for key in ("loss", "nll", "ratio_loss", "rewards/accuracy", "logps/chosen",
                        "logps/rejected"):
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (layout, key)


def test_a_model_that_cannot_share_prefixes_falls_back_and_says_so(tmp_path):
    # Chunked attention (Llama 4's attention_chunk_size) builds its own mask structure, which
    # a custom mask cannot express, so the run must use the padded layout. (Sliding windows no
    # longer fall back: tests/test_sliding_window.py.)
    model = make_model(tmp_path / "qwen", arch="qwen2", attention_chunk_size=16)
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    args = ["train", "--model", str(model), "--data", str(data), "--output-dir",
            str(tmp_path / "out"), "--max-steps", "1", "--max-length", "48",
            "--max-prompt-length", "24", "--min-response-tokens", "2", "--batch-size", "2",
            "--grad-accum", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "prefix sharing off for this model" in said and "chunked attention" in said
    assert "using the padded layout" in said

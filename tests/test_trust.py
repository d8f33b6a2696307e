"""Runs you can trust (issue #8): every case of the fault/bad-input sweep, one test each, in the
order of the issue. In-process and fast; tests/test_faults.py kills real processes."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qorpo.api import train
from qorpo.cli import app
from qorpo.config import TrainConfig
from qorpo.errors import ConfigError, DataError, MergeError, ModelError
from qorpo.runs import CHECKPOINT_MARKER, RUN_FILE, RunError
from qorpo.trainer import whole_run_train_loss
from tests.test_train import adapter_weights, base_kwargs, write_pairs
from tests.tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    model = make_model(root / "llama", arch="llama", tie=True)
    data = write_pairs(root / "pairs.jsonl", 32)
    other = write_pairs(root / "other.jsonl", 32, seed=1)
    return root, model, data, other


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def quick(model: Path, data: Path, out: Path, **kw):
    kw.setdefault("max_steps", 2)
    return base_kwargs(model, data, out, **kw)


# ----------------------------------------------------------------------------- 1. overwrite
def test_1_finished_run_is_not_overwritten_without_overwrite(work):
    root, model, data, _ = work
    out = root / "finished"
    train(**quick(model, data, out, save_steps=1))
    before = adapter_weights(out)
    assert json.loads((out / RUN_FILE).read_text())["finished"] is True
    with pytest.raises(RunError, match="already holds a finished run.*--overwrite"):
        train(**quick(model, data, out, learning_rate=1e-2))
    after = adapter_weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    # the CLI says it in one line, exit 1, no traceback
    result = cli("train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 "--max-length", "48", "--min-response-tokens", "2")
    assert result.exit_code == 1 and "already holds a finished run" in result.output
    assert "Traceback" not in result.output
    # --overwrite clears the folder first: no checkpoint of the old run survives
    assert (out / "checkpoint-2").is_dir()
    train(**quick(model, data, out, max_steps=1, save_steps=1000, overwrite=True))
    assert not (out / "checkpoint-2").exists()
    assert json.loads((out / RUN_FILE).read_text())["step"] == 1


def test_1_resume_refuses_a_checkpoint_of_another_run(work, monkeypatch):
    root, model, data, other = work
    out = root / "mixed"
    from tests.test_train import interrupt_at

    with monkeypatch.context() as m:
        interrupt_at(m, 2, "on_save")
        with pytest.raises(KeyboardInterrupt):
            train(**quick(model, data, out, max_steps=4, save_steps=2))
    with pytest.raises(RunError) as exc:  # other data set and other learning rate
        train(**quick(model, other, out, max_steps=4, save_steps=2, learning_rate=1e-2,
                      resume="latest"))
    msg = str(exc.value)
    assert "checkpoint-2" in msg and "learning_rate: 0.005 -> 0.01" in msg and "other.jsonl" in msg
    with pytest.raises(RunError, match="unfinished run.*--resume latest"):
        train(**quick(model, data, out, max_steps=4, save_steps=2))  # no --resume: refused


def test_1_default_output_dir_moves_aside(work, monkeypatch):
    root, model, data, _ = work
    monkeypatch.chdir(root)
    kw = quick(model, data, root / "unused", max_steps=1)
    kw.pop("output_dir")
    first = train(**kw)
    second = train(**kw)
    assert first.output_dir == Path("outputs/qorpo")
    assert second.output_dir == Path("outputs/qorpo-2")
    assert (root / "outputs/qorpo" / "adapter_model.safetensors").is_file()


def test_1_foreign_folder_is_refused(work):
    root, model, data, _ = work
    out = root / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="holds no qorpo run"):
        train(**quick(model, data, out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- 12. found early
@pytest.mark.parametrize("resume", ["latest", "no-such-checkpoint"])
def test_12_resume_problems_are_found_before_the_model_loads(work, monkeypatch, resume):
    root, model, data, _ = work
    out = root / f"fresh-{resume}"

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the resume point was checked")

    monkeypatch.setattr("qorpo.model.load_base_model", loaded)
    target = resume if resume == "latest" else str(root / resume)
    with pytest.raises(RunError, match="no run to resume|checkpoint"):
        train(**quick(model, data, out, resume=target))
    assert not (out / "qorpo_config.yaml").exists() and not (out / RUN_FILE).exists()


def test_12_a_run_that_fails_leaves_no_config_in_a_new_folder(work, monkeypatch):
    root, model, data, _ = work
    out = root / "fails-at-load"

    def broken(*args, **kwargs):
        raise ModelError("weights could not be read")

    monkeypatch.setattr("qorpo.model.load_base_model", broken)
    with pytest.raises(ModelError):
        train(**quick(model, data, out))
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    monkeypatch.undo()
    train(**quick(model, data, out, max_steps=1))  # the same command works once fixed
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- 2. checkpoints
def test_2_latest_means_the_newest_complete_checkpoint(work, monkeypatch):
    root, model, data, _ = work
    kw = dict(max_steps=6, save_steps=2, lora_dropout=0.0)
    train(**quick(model, data, root / "unbroken", **kw))
    out = root / "broken"
    from tests.test_train import interrupt_at

    with monkeypatch.context() as m:
        interrupt_at(m, 4, "on_save")
        with pytest.raises(KeyboardInterrupt):
            train(**quick(model, data, out, **kw, save_total_limit=None))
    # a kill while checkpoint-6 was being written: files there, marker missing
    broken = out / "checkpoint-6"
    broken.mkdir()
    (broken / "rng_state.pth").write_bytes(b"")
    assert (out / "checkpoint-4" / CHECKPOINT_MARKER).is_file()
    result = cli("train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "6", "--save-steps", "2", "--max-length", "48",
                 "--max-prompt-length", "24", "--min-response-tokens", "2", "--batch-size", "2",
                 "--grad-accum", "2", "--logging-steps", "1", "--lora-dropout", "0",
                 "--learning-rate", "5e-3", "--warmup-ratio", "0", "--no-group-by-length",
                 "--save-total-limit", "10", "--resume", "latest")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "checkpoint-6 is incomplete" in text and "Resuming from" in text
    assert "checkpoint-4" in text
    a, b = adapter_weights(root / "unbroken"), adapter_weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- 5, 14. files
def test_5_csv_numbers_are_text(tmp_path):
    from qorpo.data.sources import load_rows

    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"2+2?",4,5\n"3+3?",6,7.0\n')
    rows = load_rows(str(path))
    assert rows[0] == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert rows[1]["rejected"] == "7.0"  # as written, not re-formatted


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_14_utf8_bom_is_accepted(tmp_path, suffix):
    from qorpo.data.sources import load_rows

    row = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    text = {".jsonl": json.dumps(row) + "\n", ".json": json.dumps([row]),
            ".csv": "prompt,chosen,rejected\nHi?,Hello.,Go away.\n"}[suffix]
    path = tmp_path / f"d{suffix}"
    path.write_bytes("\ufeff".encode() + text.encode())
    assert load_rows(str(path))[0] == row


def test_14_bom_in_yaml_config_and_chat_template(tmp_path):
    from qorpo.data.encode import setup_chat_template

    yml = tmp_path / "c.yaml"
    yml.write_bytes("\ufeffmax_length: 64\n".encode())
    assert TrainConfig.load(yml).max_length == 64
    tpl = tmp_path / "t.jinja"
    tpl.write_bytes("\ufeff{% for m in messages %}{{ m['content'] }}{% endfor %}".encode())
    tok = make_tokenizer()
    assert not setup_chat_template(tok, str(tpl)).startswith("\ufeff")


# ----------------------------------------------------------------------------- 7, 8. inputs
@pytest.mark.parametrize("ref, expected", [
    ("/no/such/dir", "no such folder"),
    ("./typo", "no such folder"),
    ("acme/not-cached-anywhere", "from the Hugging Face hub"),
])
def test_7_missing_model_is_one_clear_line(work, ref, expected):
    root, _, data, _ = work
    result = cli("train", "--model", ref, "--data", str(data), "--output-dir",
                 str(root / "never"))
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 4
    assert not (root / "never").exists()


def test_7_folder_that_is_not_a_model_names_the_missing_file(work, tmp_path):
    _, model, data, _ = work
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "README.md").write_text("hello")
    with pytest.raises(ModelError, match="config.json is missing"):
        train(**quick(empty, data, tmp_path / "o"))
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((model / "config.json").read_text())
    with pytest.raises(ModelError, match="no tokenizer files"):
        train(**quick(no_tok, data, tmp_path / "o"))


def test_7_debug_shows_the_traceback(work, monkeypatch):
    root, _, data, _ = work
    monkeypatch.setenv("QORPO_DEBUG", "1")
    result = CliRunner().invoke(app, ["train", "--model", "/no/such/dir", "--data", str(data)])
    assert isinstance(result.exception, ModelError)


def test_8_output_dir_that_is_a_file(work, tmp_path):
    _, model, data, _ = work
    f = tmp_path / "out.txt"
    f.write_text("x")
    for dry in (False, True):
        with pytest.raises(RunError, match="is a file"):
            train(**quick(model, data, f), dry_run=dry)


# ----------------------------------------------------------------------------- 9. merge
def test_9_full_merge_with_another_base_is_one_line(tmp_path):
    from tests.test_merge import make_adapter

    base = make_model(tmp_path / "base", hidden_size=64)
    wider = make_model(tmp_path / "wider", hidden_size=96)
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    for method in ("stream", "full"):
        result = cli("merge", str(adapter), "--out", str(tmp_path / f"m-{method}"), "--base",
                     str(wider), "--method", method, "--no-verify")
        assert result.exit_code == 1, result.output
        assert "different base model" in result.output and "Traceback" not in result.output
        assert not (tmp_path / f"m-{method}").exists()


# ----------------------------------------------------------------------------- 10, 13. config
def test_10_non_finite_numbers_are_rejected():
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict({"learning_rate": "inf", "beta": "inf", "max_grad_norm": "nan",
                               "weight_decay": "nan"})
    text = str(exc.value)
    for name in ("learning_rate", "beta", "max_grad_norm", "weight_decay"):
        assert f"{name}: must be a finite number" in text


def test_13_max_length_alone_is_valid_and_prompt_length_follows():
    cfg = TrainConfig.from_dict({"max_length": 512})
    assert cfg.resolved_max_prompt_length == 256
    assert TrainConfig.from_dict({"max_length": 512, "max_prompt_length": 100}
                                 ).resolved_max_prompt_length == 100
    with pytest.raises(ConfigError, match="lower --max-prompt-length or raise --max-length"):
        TrainConfig.from_dict({"max_length": 64, "max_prompt_length": 64})


# ----------------------------------------------------------------------------- 11, 15. steps
def test_11_non_finite_loss_names_the_step_that_went_bad(work, monkeypatch):
    root, model, data, _ = work
    import qorpo.trainer as qt

    real, calls = qt.orpo_loss, []

    def poisoned(logps, **kw):
        out = real(logps, **kw)
        calls.append(1)
        # grad_accum 2: micro-batches 1-2 are step 1; the 3rd is the first of step 2
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 3 else out

    monkeypatch.setattr(qt, "orpo_loss", poisoned)
    with pytest.raises(qt.NonFiniteLossError, match="in step 2,"):
        train(**quick(model, data, root / "nan2", max_steps=3))


def test_15_resume_keeps_one_record_per_step_and_the_whole_run_loss(work, monkeypatch):
    root, model, data, _ = work
    kw = dict(max_steps=6, save_steps=3, lora_dropout=0.0, logging_steps=2)
    straight = train(**quick(model, data, root / "m-straight", **kw))
    out = root / "m-resumed"
    from tests.test_train import interrupt_at

    with monkeypatch.context() as m:
        interrupt_at(m, 3, "on_save")
        with pytest.raises(KeyboardInterrupt):
            train(**quick(model, data, out, **kw))
    resumed = train(**quick(model, data, out, **kw, resume="latest"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each step once, in order
    assert 3 in steps  # logged at the checkpoint, so the resumed run can count steps 1-3
    assert math.isclose(resumed.metrics["train_loss"], straight.metrics["train_loss"],
                        rel_tol=1e-5)


def test_15_whole_run_train_loss_weights_each_log_by_its_steps():
    logs = [{"step": 2, "loss": 4.0}, {"step": 3, "loss": 1.0}, {"step": 3, "loss": 1.0},
            {"step": 5, "loss": 2.0}, {"step": 5, "eval_loss": 9.0}]
    assert whole_run_train_loss(logs) == (4.0 * 2 + 1.0 + 2.0 * 2) / 5
    assert whole_run_train_loss([]) is None


# ----------------------------------------------------------------------------- 16. eval split
def test_16_max_samples_and_eval_fraction_use_the_same_rows(work, tmp_path):
    _, model, _, _ = work
    data = write_pairs(tmp_path / "many.jsonl", 180)
    res = train(**quick(model, data, tmp_path / "o", max_samples=64, eval_fraction=0.2),
                dry_run=True)
    assert res.metrics["steps"] == 2
    from qorpo.data.prepare import prepare_data

    prepared = prepare_data(TrainConfig(**quick(model, data, tmp_path / "o", max_samples=64,
                                                eval_fraction=0.2)), make_tokenizer())
    assert len(prepared.train) == 64 and len(prepared.eval) == 16


# ----------------------------------------------------------------------------- 17, 18. merge
def test_17_ctrl_c_during_merge_says_nothing_was_written(tmp_path, monkeypatch):
    from qorpo.merging import methods
    from tests.test_merge import make_adapter

    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(methods, "materialize", interrupted)
    out = tmp_path / "out"
    result = cli("merge", str(adapter), "--out", str(out), "--no-verify")
    assert result.exit_code == 130
    assert "nothing was written" in result.output
    assert list(tmp_path.glob(".out.*")) == [] and not out.exists()


def test_18_merge_accepts_the_adapter_subfolder_older_docs_named(tmp_path):
    from qorpo.merging import merge
    from tests.test_merge import make_adapter

    base = make_model(tmp_path / "base")
    run = make_adapter(base, tmp_path / "run", r=2, lora_alpha=2, target_modules=["q_proj"])
    result = merge(run / "adapter", tmp_path / "out", verify=False)
    assert result.adapter_dir == run.resolve()
    with pytest.raises(MergeError, match="does not exist"):
        merge(tmp_path / "nowhere", tmp_path / "out2", verify=False)


# ----------------------------------------------------------------------------- 4, 6. merge files
def test_6_merged_folder_has_plain_mkdir_permissions(tmp_path):
    from qorpo.merging import merge
    from tests.test_merge import make_adapter

    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    old = os.umask(0o022)
    try:
        out = merge(adapter, tmp_path / "out", verify=False).out_dir
        reference = tmp_path / "plain"
        reference.mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o755


def test_4_merge_removes_temp_folders_of_dead_merges_only(tmp_path):
    import subprocess
    import sys

    from qorpo.atomic import _HOST
    from qorpo.merging import merge
    from tests.test_merge import make_adapter

    base = make_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{_HOST}-{dead.pid}-x1"
    live = tmp_path / f".out.tmp-{_HOST}-{os.getppid()}-x2"
    other = tmp_path / f".other.tmp-{_HOST}-{dead.pid}-x3"
    for d in (stale, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 1024)
    merge(adapter, tmp_path / "out", verify=False)
    assert not stale.exists() and live.exists() and other.exists()


# ----------------------------------------------------------------------------- 19. formats
def test_19_llama_factory_messages_layout_with_content_parts(tmp_path):
    from qorpo.data.prepare import prepare_data

    def msgs(answer: str, weight: float = 1.0) -> list[dict]:
        return [{"role": "system", "content": [{"type": "text", "value": "Be brief."}],
                 "loss_weight": 0.0},
                {"role": "user", "content": [{"type": "text", "value": "What is 2 + "},
                                             {"type": "text", "value": "2?"}],
                 "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": answer}],
                 "loss_weight": weight}]

    rows = [{"chosen_messages": msgs("4."), "rejected_messages": msgs("Five, I think.")}]
    path = tmp_path / "lf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = prepare_data(TrainConfig(data=str(path), max_length=128, min_response_tokens=1),
                       make_tokenizer())
    assert out.format == "messages" and out.train_report.rows_kept == 1
    tok = make_tokenizer()
    text = tok.decode(out.train[0]["chosen_input_ids"])
    assert "What is 2 + 2?" in text and "Be brief." in text and text.endswith("4.<|im_end|>")


def test_19_openai_content_parts_and_columns_without_prompt(tmp_path):
    from qorpo.data.formats import DROP_NOT_TEXT, DropRow, to_messages

    def conv(answer):
        return [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

    pair = to_messages({"good": conv("Hello."), "bad": conv("No.")}, "columns",
                       {"chosen": "good", "rejected": "bad"})
    assert pair.prompt == [{"role": "user", "content": "Hi?"}] and pair.chosen == "Hello."
    pair = to_messages({"chosen": conv("Hello."), "rejected": conv("No.")}, "ultrafeedback", {})
    assert pair.chosen == "Hello."
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
             {"role": "assistant", "content": "x"}]
    with pytest.raises(DropRow) as exc:
        to_messages({"chosen": image, "rejected": image}, "ultrafeedback", {})
    assert exc.value.reason == DROP_NOT_TEXT


def test_19_columns_mapping_reaches_llama_factory_names(tmp_path):
    from qorpo.data.formats import detect_format

    cols = ["chosen_messages", "rejected_messages", "id"]
    assert detect_format(cols, {}, {}) == "messages"
    assert detect_format(cols, {}, {"chosen": "chosen_messages",
                                    "rejected": "rejected_messages"}) == "columns"
    with pytest.raises(DataError, match="no such column"):
        detect_format(cols, {}, {"chosen": "good", "rejected": "rejected_messages"})

"""Trust, round two (issue #18): the output folder. Each test reproduces a case of the sweep:
--overwrite removes only what the run wrote (1), actions are not saved (2), one writer per
folder (3), a stop before the first checkpoint (7), moved data (15), a truncated metrics line
(17), checkpoints whose files do not match their marker (18), a full disk (6)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qorpo.api import train
from qorpo.runs import CHECKPOINT_MARKER, CONFIG_FILE, METRICS_FILE, RUN_FILE, RunError
from tests.test_faults import ROOT, same_adapter
from tests.test_train import adapter_weights, base_kwargs, interrupt_at, write_pairs
from tests.test_trust import cli
from tests.tiny import make_model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust-runs")
    model = make_model(root / "llama", arch="llama", tie=True)
    data = write_pairs(root / "pairs.jsonl", 16)
    return root, model, data


def quick(model: Path, data: Path, out: Path, **kw):
    kw.setdefault("max_steps", 2)
    return base_kwargs(model, data, out, **kw)


def train_flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--max-length", "48", "--max-prompt-length", "24", "--min-response-tokens", "2",
            "--batch-size", "2", "--grad-accum", "2", "--logging-steps", "1",
            "--lora-dropout", "0", "--learning-rate", "5e-3", "--warmup-ratio", "0",
            "--no-group-by-length", *extra]


# ----------------------------------------------------------------------------- 1. overwrite
def test_1_overwrite_removes_only_what_the_run_wrote(work):
    root, model, data = work
    out = root / "kept"
    train(**quick(model, data, out, save_steps=1))
    (out / "notes.txt").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    assert (out / "checkpoint-2").is_dir()
    result = cli(*train_flags(model, data, out, "--max-steps", "1", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "eval" / "scores.json").is_file()
    assert not (out / "checkpoint-2").exists()
    text = " ".join(result.output.split())
    assert "keeps what the previous run did not write: eval, notes.txt" in text
    assert json.loads((out / RUN_FILE).read_text())["step"] == 1
    written = set(json.loads((out / RUN_FILE).read_text())["written"])
    assert {"adapter_model.safetensors", CONFIG_FILE, METRICS_FILE} <= written
    assert "notes.txt" not in written


def test_1_overwrite_removes_only_checkpoint_folders_the_run_wrote(work):
    """A checkpoint-N folder is the run's if the run listed it before writing it (so one cut
    short by a kill, without its marker, still goes) or if it carries qorpo's marker; a
    checkpoint-7 the user put there (another tool's) is kept."""
    root, model, data = work
    out = root / "ckpt-owner"
    train(**quick(model, data, out, save_steps=1))
    written = set(json.loads((out / RUN_FILE).read_text())["written"])
    assert {"checkpoint-1", "checkpoint-2"} <= written  # listed before the Trainer wrote them
    (out / "checkpoint-2" / CHECKPOINT_MARKER).unlink()  # as if killed while saving it
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "model.safetensors").write_bytes(b"someone else's")
    result = cli(*train_flags(model, data, out, "--max-steps", "1", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (out / "checkpoint-2").exists()  # the cut-short one went too
    now = set(json.loads((out / RUN_FILE).read_text())["written"])
    assert "checkpoint-2" not in now and "checkpoint-7" not in now  # (the new run saves step 1)
    assert (out / "checkpoint-7" / "model.safetensors").read_bytes() == b"someone else's"
    assert "checkpoint-7" in " ".join(result.output.split())  # named among what is kept


def test_1_a_project_folder_with_a_config_is_not_a_run(work, monkeypatch):
    """The sweep's case: `output_dir: .` in a project folder that holds a qorpo_config.yaml
    (the user's), src/ and data/: --overwrite wiped them, then crashed."""
    root, model, data = work
    project = root / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hi')\n")
    (project / "data").mkdir()
    (project / CONFIG_FILE).write_text(f"model: {model}\ndata: {data}\noutput_dir: .\n")
    monkeypatch.chdir(project)
    result = cli("train", CONFIG_FILE, "--overwrite", "--max-steps", "1")
    assert result.exit_code == 1 and "holds no qorpo run" in result.output
    assert "Traceback" not in result.output
    assert (project / "src" / "main.py").is_file() and (project / "data").is_dir()
    assert sorted(p.name for p in project.iterdir()) == ["data", CONFIG_FILE, "src"]


def test_1_overwrite_of_a_run_in_the_current_folder_keeps_the_project(work, monkeypatch):
    root, model, data = work
    here = root / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    train(**quick(model, data, Path("."), max_steps=1))
    (here / "src").mkdir()
    (here / "src" / "main.py").write_text("x = 1\n")
    train(**quick(model, data, Path("."), max_steps=1, overwrite=True))
    assert (here / "src" / "main.py").read_text() == "x = 1\n"
    assert (here / "adapter_model.safetensors").is_file() and here.is_dir()


def test_1_overwrite_never_removes_the_runs_own_inputs(work):
    root, model, data = work
    out = root / "inputs-inside"
    train(**quick(model, data, out, max_steps=1))
    inside = out / METRICS_FILE  # a data file named like a file the run writes
    inside.write_text(data.read_text())
    with pytest.raises(RunError, match="holds .*metrics.jsonl.*move the input"):
        train(**quick(model, inside, out, max_steps=1, overwrite=True))
    assert inside.read_text() == data.read_text()


def test_1_symlinked_output_folder_is_resolved_first(work):
    root, model, data = work
    real = root / "real-run"
    train(**quick(model, data, real, max_steps=2, save_steps=1))
    (real / "notes.txt").write_text("mine")
    link = root / "link-to-run"
    link.symlink_to(real, target_is_directory=True)
    train(**quick(model, data, link, max_steps=1, overwrite=True))
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "notes.txt").read_text() == "mine"
    assert not (real / "checkpoint-2").exists()
    assert json.loads((real / RUN_FILE).read_text())["step"] == 1


# ----------------------------------------------------------------------------- 2. actions
def test_2_saved_config_replays_without_replacing_the_run(work):
    root, model, data = work
    out = root / "replay"
    train(**quick(model, data, out, max_steps=1, overwrite=True))
    saved = (out / CONFIG_FILE).read_text()
    assert "overwrite" not in saved and "resume" not in saved
    before = adapter_weights(out)
    result = cli("train", str(out / CONFIG_FILE))
    assert result.exit_code == 1 and "already holds a finished run" in result.output
    after = adapter_weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- 3. one writer
HOLD_AT_STEP = """
import os, time
from pathlib import Path
import qorpo.trainer as qt
_real = qt.ORPOTrainer.compute_loss
def _compute_loss(self, *a, **k):
    if self.model.training and self.state.global_step == 1:
        Path({ready!r}).touch()
        while not Path({go!r}).exists():
            time.sleep(0.1)
    return _real(self, *a, **k)
qt.ORPOTrainer.compute_loss = _compute_loss
"""


def _start(args: list[str], fault: str = "") -> subprocess.Popen:
    code = textwrap.dedent(fault) + "\nimport sys\nfrom qorpo.cli import main\n" \
        f"sys.argv = ['qorpo', *{args!r}]\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_3_a_second_run_into_a_live_runs_folder_is_refused(work):
    root, model, data = work
    out, ready, go = root / "live", root / "live.ready", root / "live.go"
    first = _start(train_flags(model, data, out, "--max-steps", "3", "--save-steps", "1"),
                   HOLD_AT_STEP.format(ready=str(ready), go=str(go)))
    try:
        _wait_for(ready, first)
        for extra in ((), ("--overwrite",), ("--resume", "latest")):
            second = cli(*train_flags(model, data, out, "--max-steps", "2", *extra))
            assert second.exit_code == 1, (extra, second.output)
            text = " ".join(second.output.split())
            assert "in use by another qorpo run" in text and f"pid {first.pid}" in text
            assert "Traceback" not in second.output
        assert (out / "checkpoint-1" / CHECKPOINT_MARKER).is_file()  # the live run's, intact
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads((out / RUN_FILE).read_text())["finished"] is True
    assert not (out / ".qorpo.lock").exists()


def test_3_the_lock_of_a_killed_run_is_taken_over(work):
    root, model, data = work
    out, ready = root / "killed", root / "killed.ready"
    first = _start(train_flags(model, data, out, "--max-steps", "3", "--save-steps", "1"),
                   HOLD_AT_STEP.format(ready=str(ready), go=str(root / "never")))
    _wait_for(ready, first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (out / ".qorpo.lock").exists()  # a kill -9 runs no cleanup
    resumed = cli(*train_flags(model, data, out, "--max-steps", "3", "--save-steps", "1",
                               "--resume", "latest"))
    assert resumed.exit_code == 0, resumed.output
    text = " ".join(resumed.output.split())
    assert f"pid {first.pid}" in text and "checkpoint-1" in text
    assert not (out / ".qorpo.lock").exists()


def test_3_a_failed_run_leaves_no_lock_and_no_new_folder(work):
    root, model, data = work
    out = root / "new-folder" / "run"
    with pytest.raises(Exception):  # noqa: B017 - any failure before the folder is written
        train(**quick(model, root / "missing.jsonl", out))
    assert not out.exists()
    result = cli(*train_flags(model, data, out, "--max-steps", "1", "--dry-run"))
    assert result.exit_code == 0, result.output
    assert not out.exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------- 7. early stop
def test_7_a_stop_before_the_first_checkpoint_says_what_works(work, monkeypatch):
    root, model, data = work
    out = root / "early-stop"
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(**quick(model, data, out, max_steps=4, save_steps=100))
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(RunError, match="stopped before its first checkpoint.*--overwrite"):
        train(**quick(model, data, out, max_steps=4, save_steps=100))
    with pytest.raises(RunError, match="no complete checkpoint.*--overwrite"):
        train(**quick(model, data, out, max_steps=4, save_steps=100, resume="latest"))
    train(**quick(model, data, out, max_steps=4, save_steps=100, overwrite=True))
    assert json.loads((out / RUN_FILE).read_text())["finished"] is True


def test_7_the_interrupt_message_does_not_promise_a_resume(work, capsys, monkeypatch):
    root, model, data = work
    from rich.console import Console

    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(**quick(model, data, root / "no-ckpt", max_steps=4, save_steps=100),
                  console=Console(width=300))
    said = capsys.readouterr().out
    assert "nothing to resume" in said and "--resume latest` continues" not in said


# ----------------------------------------------------------------------------- 15, 17, 18
def _stopped_at(work, monkeypatch, name: str, step: int = 2, **kw) -> Path:
    root, model, data = work
    out = root / name
    with monkeypatch.context() as m:
        interrupt_at(m, step, "on_save")
        with pytest.raises(KeyboardInterrupt):
            train(**quick(model, kw.pop("data", data), out, max_steps=4, save_steps=1,
                          save_total_limit=None, **kw))
    return out


def test_15_resume_with_the_same_data_at_a_new_path(work, monkeypatch):
    root, model, data = work
    copy = root / "moved" / "pairs.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    out = _stopped_at(work, monkeypatch, "moved-data")
    result = cli(*train_flags(model, copy, out, "--max-steps", "4", "--save-steps", "1",
                              "--save-total-limit", "10", "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert "same sha256" in " ".join(result.output.split())
    copy.write_text(copy.read_text() + copy.read_text().splitlines()[0] + "\n")
    changed = cli(*train_flags(model, copy, out, "--overwrite", "--max-steps", "1"))
    assert changed.exit_code == 0  # (a different file is a different run: start over)


def test_17_a_metrics_line_cut_short_does_not_stop_the_resume(work, monkeypatch):
    root, model, data = work
    out = _stopped_at(work, monkeypatch, "cut-metrics")
    with (out / METRICS_FILE).open("a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill in the middle of a write
    train(**quick(model, data, out, max_steps=4, save_steps=1, save_total_limit=None,
                  resume="latest"))
    records = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_18_a_checkpoint_missing_a_file_is_not_the_newest(work, monkeypatch):
    root, model, data = work
    out = _stopped_at(work, monkeypatch, "partial-copy")
    marker = json.loads((out / "checkpoint-2" / CHECKPOINT_MARKER).read_text())
    assert {"trainer_state.json", "adapter_model.safetensors"} <= set(marker["files"])
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # a partial copy
    result = cli(*train_flags(model, data, out, "--max-steps", "4", "--save-steps", "1",
                              "--save-total-limit", "10", "--resume", "latest"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "checkpoint-2 is incomplete" in text and "Resuming from" in text
    assert str(out / "checkpoint-1") in text


def test_18_a_tampered_checkpoint_is_named_and_skipped(work, monkeypatch):
    root, model, data = work
    out = _stopped_at(work, monkeypatch, "tampered")
    state = out / "checkpoint-2" / "trainer_state.json"
    text = state.read_text()
    state.write_text(text.replace('"global_step": 2', '"global_step": 9'))  # same length
    with pytest.raises(RunError, match="trainer_state.json changed after the checkpoint"):
        train(**quick(model, data, out, max_steps=4, save_steps=1,
                      resume=str(out / "checkpoint-2")))
    result = cli(*train_flags(model, data, out, "--max-steps", "4", "--save-steps", "1",
                              "--save-total-limit", "10", "--resume", "latest"))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "checkpoint-2 was changed after it was saved (trainer_state.json" in said
    assert str(out / "checkpoint-1") in said


# ----------------------------------------------------------------------------- 6. disk full
def test_6_disk_full_while_checkpointing(work, monkeypatch):
    """ENOSPC while checkpoint-2's optimizer state is written: one sentence naming the folder
    and the space needed; checkpoint-1 intact, nothing half written; resuming continues."""
    root, model, data = work
    out = root / "disk-full"
    kw = dict(max_steps=3, save_steps=1, save_total_limit=None)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(RunError) as exc:
            train(**quick(model, data, out, **kw))
    msg = str(exc.value)
    assert f"disk full while writing to {out}" in msg and "MiB free" in msg
    assert "checkpoint-1 is intact" in msg
    assert not (out / "checkpoint-2").exists() and not (out / ".saving").exists()
    assert (out / "checkpoint-1" / CHECKPOINT_MARKER).is_file()
    assert not list(out.glob(".*tmp*"))
    train(**quick(model, data, out, **kw, resume="latest"))
    unbroken = root / "disk-full-unbroken"
    train(**quick(model, data, unbroken, **kw))
    same_adapter(unbroken, out)


def test_planned_steps_are_the_trainers_steps(work):
    """5 micro-batches an epoch, 4 per step, 3 epochs: the Trainer takes 2 steps an epoch
    (the last window is short), 6 in all; the start table and progress bar say the same."""
    root, model, data = work
    kw = dict(max_steps=-1, epochs=3, batch_size=2, grad_accum=4, max_samples=10)
    out = root / "steps"
    planned = train(**quick(model, data, out, **kw), dry_run=True)
    assert planned.metrics["steps"] == 6
    train(**quick(model, data, out, **kw))
    state = json.loads((out / RUN_FILE).read_text())
    assert state["step"] == 6
    # the finished run draws its curves, and lists them as its own (what --overwrite removes)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves.png" in state["written"]


def test_8_a_real_run_records_its_base_and_merge_refuses_another(work, tmp_path):
    """End to end: what training records in qorpo_run.json is what merge checks (the data
    folder's copy of the adapter has no other clue: base_model_name_or_path points nowhere)."""
    from qorpo.errors import MergeError
    from qorpo.merging import merge

    root, model, data = work
    out = root / "arch-run"
    train(**quick(model, data, out, max_steps=1))
    base = json.loads((out / RUN_FILE).read_text())["base_model"]
    assert base["model_type"] == "llama" and base["architectures"] == ["LlamaForCausalLM"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg,
                                                         "base_model_name_or_path": "gone"}))
    qwen = make_model(tmp_path / "qwen2", arch="qwen2", tie=True)
    with pytest.raises(MergeError, match=r"llama.*qwen2"):
        merge(out, tmp_path / "merged", base=qwen, verify=False)


def test_12_pairs_longer_than_the_models_context_are_refused(work, tmp_path):
    """The tiny model's context is 512 (max_position_embeddings): --max-length 1024 with pairs
    that reach past it is refused before the model loads; pairs that all fit get a note."""
    from qorpo.errors import ConfigError

    root, model, data = work
    assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == 512
    long = tmp_path / "long.jsonl"
    words = " ".join(f"word{i}" for i in range(400))
    long.write_text("".join(json.dumps({"prompt": f"q{i} {words}", "chosen": f"yes {words}",
                                        "rejected": f"no {words}"}) + "\n" for i in range(4)))
    kw = dict(max_length=1024, max_prompt_length=512)
    with pytest.raises(ConfigError, match=r"longer than .*context of 512.*--max-length 512"):
        train(**quick(model, long, tmp_path / "long-run", **kw), dry_run=True)
    result = cli(*train_flags(model, data, tmp_path / "short-run", "--dry-run",
                              "--max-length", "1024", "--max-prompt-length", "512"))
    assert result.exit_code == 0, result.output
    assert "above the model's context of 512" in " ".join(result.output.split())

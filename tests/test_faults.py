"""Fault injection with real processes: `kill -9` during training, while a checkpoint is being
written and during a merge; SIGTERM; reruns into finished folders. Each test asserts what
survives and that the next command works. A fault is injected from *inside* the child at an
exact point (a patched library call sends the signal to its own process), so the tests are
deterministic; the signal is the real one, and no cleanup code of ours runs after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qorpo.runs import CHECKPOINT_MARKER, RUN_FILE
from tests.test_train import write_pairs
from tests.tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--max-length", "48", "--max-prompt-length", "24", "--min-response-tokens", "2",
         "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1",
         "--lora-dropout", "0", "--learning-rate", "5e-3", "--warmup-ratio", "0",
         "--no-group-by-length", "--max-steps", "6", "--save-steps", "2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, make_model(root / "llama", arch="llama", tie=True), write_pairs(
        root / "pairs.jsonl", 24)


def qorpo(*args: str, fault: str = "") -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process; `fault` is Python run first (it patches a library
    call to signal its own process at the chosen moment)."""
    code = textwrap.dedent(fault) + "\nimport sys\nfrom qorpo.cli import main\n" \
        f"sys.argv = ['qorpo', *{list(args)!r}]\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            *TRAIN, *extra]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def same_adapter(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=1e-6, rtol=1e-6)


KILL_AT_STEP = """
import os, signal
import qorpo.trainer as qt
_real = qt.ORPOTrainer.compute_loss
def _compute_loss(self, *a, **k):
    if self.model.training and self.state.global_step == {step}:
        os.kill(os.getpid(), signal.{sig})
    return _real(self, *a, **k)
qt.ORPOTrainer.compute_loss = _compute_loss
"""

KILL_WHILE_SAVING = """
import os, signal
import transformers.trainer as T
_real = T.Trainer._save_rng_state
def _save_rng_state(self, output_dir):
    if self.state.global_step == {step}:  # model and optimizer written, the rest not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(self, output_dir)
T.Trainer._save_rng_state = _save_rng_state
"""


@pytest.fixture(scope="module")
def unbroken(work):
    root, model, data = work
    out = root / "unbroken"
    done = qorpo(*train_args(model, data, out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_kill_9_between_checkpoints_then_resume(work, unbroken):
    root, model, data = work
    out = root / "killed"
    killed = qorpo(*train_args(model, data, out), fault=KILL_AT_STEP.format(step=3,
                                                                            sig="SIGKILL"))
    assert killed.returncode == -signal.SIGKILL
    assert (out / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    assert not (out / "adapter_model.safetensors").exists()  # nothing final was claimed
    assert json.loads((out / RUN_FILE).read_text())["finished"] is False
    rerun = qorpo(*train_args(model, data, out))  # forgot --resume: refused, nothing touched
    assert rerun.returncode == 1 and "unfinished run" in rerun.stderr
    assert "Traceback" not in rerun.stderr
    resumed = qorpo(*train_args(model, data, out, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_adapter(unbroken, out)


def test_kill_9_while_a_checkpoint_is_written(work, unbroken):
    root, model, data = work
    out = root / "killed-saving"
    killed = qorpo(*train_args(model, data, out), fault=KILL_WHILE_SAVING.format(step=4))
    assert killed.returncode == -signal.SIGKILL
    broken = out / "checkpoint-4"
    assert broken.is_dir() and not (broken / CHECKPOINT_MARKER).exists()
    assert not (broken / "trainer_state.json").exists()  # what used to crash the resume
    resumed = qorpo(*train_args(model, data, out, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = " ".join(resumed.stdout.split())
    assert "checkpoint-4 is incomplete" in said and "checkpoint-2" in said
    same_adapter(unbroken, out)
    assert (out / "checkpoint-6" / CHECKPOINT_MARKER).is_file()


def test_sigterm_saves_the_adapter_and_exits_143(work):
    root, model, data = work
    out = root / "terminated"
    term = qorpo(*train_args(model, data, out), fault=KILL_AT_STEP.format(step=3,
                                                                          sig="SIGTERM"))
    assert term.returncode == 143, term.stderr[-2000:]
    assert "Terminated (SIGTERM): adapter saved" in " ".join(term.stdout.split())
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".saving*"))
    resumed = qorpo(*train_args(model, data, out, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_rerun_into_a_finished_folder(work, unbroken):
    root, model, data = work
    before = adapter(unbroken)
    again = qorpo(*train_args(model, data, unbroken))
    assert again.returncode == 1 and "already holds a finished run" in again.stderr
    assert all(torch.equal(before[k], v) for k, v in adapter(unbroken).items())
    replaced = qorpo(*train_args(model, data, unbroken, "--overwrite", "--max-steps", "2"))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((unbroken / RUN_FILE).read_text())["step"] == 2


KILL_DURING_MERGE = """
import os, signal
from qorpo.merging import shards
_real = shards.ShardWriter._finish_shard
def _finish_shard(self):
    _real(self)
    os.kill(os.getpid(), signal.SIGKILL)  # after the first shard hit the disk
shards.ShardWriter._finish_shard = _finish_shard
"""


def test_kill_9_during_merge_then_merge_again(work, unbroken):
    root, _, _ = work
    out = root / "merged"
    killed = qorpo("merge", str(unbroken), "--out", str(out), "--no-verify",
                   "--max-shard-size", "100KB", fault=KILL_DURING_MERGE)
    assert killed.returncode == -signal.SIGKILL
    leftovers = list(root.glob(".merged.tmp-*"))
    assert len(leftovers) == 1 and any(leftovers[0].iterdir()) and not out.exists()
    again = qorpo("merge", str(unbroken), "--out", str(out), "--no-verify")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not leftovers[0].exists() and (out / "model.safetensors").is_file()
    rerun = qorpo("merge", str(unbroken), "--out", str(out), "--no-verify")
    assert rerun.returncode == 1 and "already exists" in rerun.stderr


def test_sigterm_during_merge_leaves_nothing(work, unbroken):
    root, _, _ = work
    out = root / "merged-term"
    term = qorpo("merge", str(unbroken), "--out", str(out), "--no-verify",
                 "--max-shard-size", "100KB",
                 fault=KILL_DURING_MERGE.replace("SIGKILL", "SIGTERM"))
    assert term.returncode == 143, term.stderr[-2000:]
    assert "nothing was written" in term.stderr
    assert not out.exists() and not list(root.glob(".merged-term.*"))

"""Multi-process training on torch.distributed (gloo, CPU, tiny 4-bit model): N processes x
batch b x accumulation k is the optimisation of one process with batch b and accumulation N*k;
only rank 0 prints and writes; resume works; one rank's failure ends the run with its message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qorpo.runs import CHECKPOINT_MARKER
from tests.test_train import write_pairs
from tests.tiny import make_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
COMMON = ["--max-length", "48", "--max-prompt-length", "24", "--min-response-tokens", "2",
          "--grad-accum", "1", "--logging-steps", "1", "--lora-dropout", "0",
          "--learning-rate", "5e-3", "--warmup-ratio", "0", "--no-group-by-length",
          "--max-steps", "4", "--save-steps", "2", "--eval-fraction", "0.2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, make_model(root / "llama", arch="llama", tie=True), write_pairs(
        root / "pairs.jsonl", 40)


def launch(nproc: int, *args: str, fault: str = "", launcher: str = "torchrun",
           timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONPATH": str(ROOT), "QORPO_TEST_FAULT": fault}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), str(WORKER), *args]
    elif launcher == "accelerate":  # --multi_gpu: accelerate's multi-process launcher, which
        # runs on CPUs too (gloo); its --cpu flag means one process
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", "0", "-m", "qorpo", *args]
    else:
        cmd = [sys.executable, str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def train_args(model: Path, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            *COMMON, "--batch-size", str(batch), *extra]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=tol, rtol=tol)
    la, lb = [r for r in logs(a) if "loss" in r], [r for r in logs(b) if "loss" in r]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb, strict=True):  # the metrics are the whole batch's, not rank 0's
        for key in ("loss", "nll", "ratio_loss", "rewards/accuracy", "rewards/margin",
                    "logps/chosen", "logps/rejected"):
            assert abs(ra[key] - rb[key]) <= tol * max(1.0, abs(ra[key])), (key, ra, rb)
    ea, eb = [r for r in logs(a) if "eval_loss" in r], [r for r in logs(b) if "eval_loss" in r]
    assert ea and len(ea) == len(eb)
    for ra, rb in zip(ea, eb, strict=True):
        for key in ("eval_loss", "eval_rewards/accuracy", "eval_nll"):
            assert abs(ra[key] - rb[key]) <= tol * max(1.0, abs(ra[key])), (key, ra, rb)


@pytest.fixture(scope="module")
def two_procs(work):
    root, model, data = work
    out = root / "two"
    done = launch(2, *train_args(model, data, out, 2))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_two_processes_equal_one_with_accumulation(work, two_procs):
    root, model, data = work
    out, _ = two_procs
    one_acc = root / "one-acc"
    done = launch(1, *train_args(model, data, one_acc, 2, "--grad-accum", "2"), launcher="plain")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(one_acc, out)


def test_two_processes_equal_one_big_batch(work):
    """The same with plain SGD: one batch of 4 sums the gradient in another order than 2 + 2,
    and AdamW's normalisation would amplify that rounding (~1e-7) in weights whose gradient is
    near zero; SGD keeps the comparison about the optimisation, not about rounding."""
    root, model, data = work
    sgd = ("--optim", "sgd", "--learning-rate", "0.5")
    two, big = root / "two-sgd", root / "one-big-sgd"
    r1 = launch(2, *train_args(model, data, two, 2, *sgd))
    r2 = launch(1, *train_args(model, data, big, 4, *sgd), launcher="plain")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    assert_same_run(big, two)


def test_only_rank_0_prints_and_writes(two_procs):
    out, done = two_procs
    said = done.stdout
    for line, times in (("Parity check passed", 1), ("qorpo train", 1), ("qorpo: done", 1),
                        ("rows kept", 2)):  # the drop tables of the train and the eval rows
        assert said.count(line) == times, line
    flat = " ".join(said.split())
    assert "× 2 processes = 4 pairs/step" in flat and "2 (gloo)" in flat
    names = sorted(p.name for p in out.iterdir())
    assert names.count("metrics.jsonl") == 1 and "adapter_model.safetensors" in names
    assert (out / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state*")} == {
        "rng_state_0.pth", "rng_state_1.pth"}


def test_dry_run_reports_the_processes(work):
    root, model, data = work
    done = launch(2, *train_args(model, data, root / "dry", 2), "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    said = " ".join(done.stdout.split())
    assert "× 2 processes = 4 pairs/step" in said and "per process: 2 pairs" in said
    assert said.count("Dry run") == 1


KILL_RANK0_AT_STEP_3 = """
import os, signal
import qorpo.trainer as qt
_real = qt.ORPOTrainer.compute_loss
def _cl(self, model, *a, **k):
    if model.training and self.state.global_step == 3 and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(self, model, *a, **k)
qt.ORPOTrainer.compute_loss = _cl
"""


def test_killed_two_process_run_resumes_to_the_same_adapter(work, two_procs):
    root, model, data = work
    unbroken, _ = two_procs
    out = root / "two-killed"
    killed = launch(2, *train_args(model, data, out, 2), fault=KILL_RANK0_AT_STEP_3)
    assert killed.returncode != 0
    assert (out / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    assert not (out / "adapter_model.safetensors").exists()
    resumed = launch(2, *train_args(model, data, out, 2, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    x, y = adapter(unbroken), adapter(out)
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=1e-6, rtol=1e-6)


BAD_BATCH_ON_RANK1 = """
import os
import qorpo.trainer as qt
from qorpo.errors import DataError
_real = qt.ORPOTrainer.compute_loss
def _cl(self, model, *a, **k):
    if model.training and self.state.global_step == 2 and os.environ["RANK"] == "1":
        raise DataError("injected bad batch on rank 1")
    return _real(self, model, *a, **k)
qt.ORPOTrainer.compute_loss = _cl
"""


def test_an_error_on_one_rank_ends_every_rank_with_its_message(work):
    root, model, data = work
    start = time.perf_counter()
    failed = launch(2, *train_args(model, data, root / "bad", 2), fault=BAD_BATCH_ON_RANK1,
                    timeout=180)
    took = time.perf_counter() - start
    assert failed.returncode != 0
    err = failed.stderr
    assert "[rank 1] error: injected bad batch on rank 1" in err
    assert "qorpo hit an internal error" not in err  # rank 0 says why it stopped instead
    assert took < 120  # promptly: no collective timeout (30 min by default)


def test_accelerate_launch_runs_the_same_optimisation(work, two_procs):
    root, model, data = work
    unbroken, _ = two_procs
    out = root / "accelerate"
    done = launch(2, *train_args(model, data, out, 2), launcher="accelerate")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_run(unbroken, out, tol=1e-6)


def test_python_dash_m_qorpo(tmp_path):
    done = subprocess.run([sys.executable, "-m", "qorpo", "--version"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("qorpo ")
    assert signal.SIGTERM  # (module used above)

"""The memory estimate (#13): it adds up, grows the right way, needs no weights, and matches a
measured run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qorpo.cli import app
from qorpo.memory import MODELS, Workload, estimate
from qorpo.memory.plan import Capacity, assumed_lengths, plan, workload
from tests.test_train import write_pairs
from tests.tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SMOL = MODELS["Llama-3.2-1B"]  # (a small model from the docs table)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_components_add_up(device):
    est = estimate(SMOL, workload=Workload(4, 1000, 1500, True), device=device)
    parts = {k: v for k, v in est._asdict().items() if k != "naive_logits"}
    assert est.total == pytest.approx(sum(parts.values()))
    assert est.allocated == pytest.approx(est.total - est.allowance)
    assert all(v >= 0 for v in parts.values()) and est.attention_mask == 4 * 1000**2


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_estimate_grows_the_right_way(device):
    def total(model=SMOL, length=1024, pairs=2, **kw):
        return estimate(model, length, pairs=pairs, device=device, **kw).total

    assert total(length=512) < total(length=1024) < total(length=2048)
    assert total(pairs=1) < total(pairs=2) < total(pairs=4)
    assert total(lora_r=8) < total(lora_r=16) < total(lora_r=64)
    small = replace(SMOL, vocab=32000)
    assert total(model=small) < total()
    assert total(checkpointing=True) < total(checkpointing=False)
    if device == "cpu":
        assert total(low_cpu_memory=True) < total()


def test_layouts_need_less_as_the_prompt_is_shared():
    pairs = [(400, 300, 250), (380, 120, 200), (90, 60, 80), (300, 310, 290)]
    work = {lay: workload(pairs, lay) for lay in ("padded", "shared", "packed")}
    assert work["padded"].rows == 8 and work["shared"].rows == 4
    assert work["packed"].tokens <= work["shared"].tokens < work["padded"].tokens
    for device in ("cuda", "cpu"):
        t = {k: estimate(SMOL, workload=w, device=device).total for k, w in work.items()}
        assert t["packed"] <= t["shared"] < t["padded"]


@pytest.mark.parametrize("layout", ["padded", "shared", "packed"])
def test_workload_is_the_batch_the_collator_builds(layout):
    """The estimate's rows x length are those of the real micro-batch (packed rows as long as
    the collator's cost model makes them for this model width), for random pair lengths."""
    import random

    from qorpo.data.collate import build_batch

    rng = random.Random(7)
    for trial in range(40):
        pairs = [(rng.randint(1, 300), rng.randint(1, 400), rng.randint(1, 400))
                 for _ in range(rng.randint(1, 9))]
        hidden = rng.choice([64, 576, 4096])
        pair_attention = trial % 2 == 1  # qorpo.attention: the collator's attention cost is 0
        batch = build_batch([([1] * p, [2] * c, [3] * r) for p, c, r in pairs], layout,
                            pad_to_multiple_of=8,
                            attention_cost=0.0 if pair_attention else 1 / (6 * hidden))
        work = workload(pairs, layout, hidden=hidden, pair_attention=pair_attention)
        assert (work.rows, work.length) == tuple(batch.input_ids.shape), (trial, pairs)


def test_plan_says_what_to_turn_when_it_does_not_fit():
    t4 = Capacity("cuda", 16 * GIB * 0.94, "T4")
    big = plan(MODELS["Llama-3.1-8B"], assumed_lengths(4096) * 8, device="cuda", batch_size=8,
               layout="padded", max_length=4096, max_prompt_length=2048, capacity=t4)
    assert big.fits is False and big.headroom < 0
    assert big.knobs and big.knobs[0].fits  # the first suggestion is one that fits
    assert "--batch-size 1" in big.knobs[0].change
    ok = plan(MODELS["Llama-3.1-8B"], assumed_lengths(1024), device="cuda", batch_size=1,
              layout="packed", max_length=1024, max_prompt_length=512, capacity=t4)
    assert ok.fits and ok.headroom > 0 and ok.knobs == ()
    j = ok.to_json()
    assert set(j) >= {"device", "total_gb", "components_gb", "fits", "headroom_gb"}


def test_estimate_command_json(tmp_path):
    model = make_model(tmp_path / "m", arch="llama")
    result = CliRunner().invoke(app, ["estimate", "--model", str(model), "--max-length", "256",
                                      "--gpu-memory", "8GB", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["device"] == "cuda" and out["fits"] is True
    assert out["largest"]["max_length_at_batch_1"] >= 256
    assert out["note"] == ""  # a GPU estimate promises its number
    cpu = json.loads(CliRunner().invoke(app, ["estimate", "--model", str(model), "--device",
                                              "cpu", "--json"]).output)
    assert "--low-cpu-memory" in cpu["note"]  # glibc's default allocator: said, not hidden
    low = json.loads(CliRunner().invoke(app, ["estimate", "--model", str(model), "--device",
                                              "cpu", "--low-cpu-memory", "--json"]).output)
    assert low["note"] == "" and low["total_gb"] < cpu["total_gb"]
    bad = CliRunner().invoke(app, ["estimate", "--model", str(tmp_path / "none")])
    assert bad.exit_code == 1 and "config.json" in bad.output


AUDIT = """
import sys
opened = []
sys.addaudithook(lambda e, a: opened.append(str(a[0])) if e == "open" and a and
                 isinstance(a[0], (str, bytes)) else None)
from qorpo.cli import main
sys.argv = ["qorpo", *{args!r}]
try:
    main()
except SystemExit as exc:
    code = exc.code
weights = [p for p in opened if p.endswith((".safetensors", ".bin", ".pt"))]
print("WEIGHTS", weights)
"""


def test_dry_run_prints_the_estimate_without_opening_a_weight_file(tmp_path):
    model = make_model(tmp_path / "m", arch="llama")
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    args = ["train", "--model", str(model), "--data", str(data), "--output-dir",
            str(tmp_path / "o"), "--max-length", "48", "--min-response-tokens", "2",
            "--dry-run", "--gpu-memory", "16GB"]
    done = subprocess.run([sys.executable, "-c", AUDIT.format(args=args)], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "COLUMNS": "200",
                                                    "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WEIGHTS []" in done.stdout
    said = " ".join(done.stdout.split())
    assert "memory estimate (cuda" in said and "fits" in said and "layer recompute" in said
    js = subprocess.run([sys.executable, "-m", "qorpo", *args, "--json"], capture_output=True,
                        text=True, cwd=ROOT)
    out = json.loads(js.stdout)
    assert out["memory"]["device"] == "cuda" and out["steps"] > 0


@pytest.mark.slow
def test_cpu_estimate_is_within_15_percent_of_a_measured_run(tmp_path):
    """A tiny model trained for 2 steps in a child process (--low-cpu-memory: the estimate is
    exact for it); the run compares its own estimate with its peak RSS."""
    model = make_model(tmp_path / "m", arch="llama", hidden_size=256, layers=4,
                       intermediate_size=1024)
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    code = ("import json, torch; torch.set_num_threads(1)\n"
            "from rich.console import Console\nfrom qorpo.api import train\n"
            f"r = train(model={str(model)!r}, data={str(data)!r}, output_dir="
            f"{str(tmp_path / 'o')!r}, max_length=48, min_response_tokens=2, batch_size=4, "
            "grad_accum=1, max_steps=2, low_cpu_memory=True, console=Console(quiet=True))\n"
            "print('RESULT', json.dumps(r.metrics))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                         "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.split("RESULT", 1)[1])
    measured, est = m["peak_memory_gib"], m["peak_memory_estimate_gib"]
    assert abs(est / measured - 1) <= 0.15, (est, measured)

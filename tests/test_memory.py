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
        return estimate(model, length, pairs=pairs, device=device, **kw).allocated

    # `allocated`: the step (CUDA: tensors; CPU: the step's RSS without the runtime and the
    # loading phase). On a CPU a short step's total is the loading phase's peak (flat in
    # length, as measured): the step must still grow, and the total never shrink.
    assert total(length=512) < total(length=1024) < total(length=2048)
    totals = [estimate(SMOL, n, pairs=2, device=device).total for n in (256, 512, 1024, 4096)]
    assert totals == sorted(totals) and totals[-1] > totals[0]
    assert total(pairs=1) < total(pairs=2) < total(pairs=4)
    assert total(lora_r=8) < total(lora_r=16) < total(lora_r=64)
    small = replace(SMOL, vocab=32000)
    assert total(model=small) < total()
    assert total(checkpointing=True) < total(checkpointing=False)


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
        # qorpo.attention.cost: with per-pair kernels or FlexAttention the attention cost is 0
        kernel = (None, "qorpo_pairs", "flex_attention")[trial % 3]
        batch = build_batch([([1] * p, [2] * c, [3] * r) for p, c, r in pairs], layout,
                            pad_to_multiple_of=8,
                            attention_cost=0.0 if kernel else 1 / (6 * hidden))
        work = workload(pairs, layout, hidden=hidden, kernel=kernel)
        assert (work.rows, work.length) == tuple(batch.input_ids.shape), (trial, pairs)
        # FlexAttention gets a BlockMask, never the dense (R, 1, L, L) mask the others get
        if layout != "padded":  # (padded rows: the model builds its own mask, any kernel)
            assert work.mask == (kernel != "flex_attention"), (trial, kernel)
        assert work.pair_attention == (kernel == "qorpo_pairs" and layout != "padded")


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
    assert out["note"] == "" and out["default_allocator_bound_gb"] is None  # GPU: its number

    def cpu(*flags: str) -> dict:
        return json.loads(CliRunner().invoke(app, ["estimate", "--model", str(model), "--device",
                                                   "cpu", "--json", *flags]).output)

    auto, low, fast = cpu(), cpu("--low-cpu-memory"), cpu("--no-low-cpu-memory")
    # glibc's default allocator: a range, said and not hidden; pinned: the estimate is the peak
    assert auto["default_allocator_bound_gb"] > auto["total_gb"] > 0
    assert auto["low_cpu_memory"] is False and "--low-cpu-memory" in auto["note"]  # RAM enough
    assert low["low_cpu_memory"] is True and low["note"] == ""
    assert fast["low_cpu_memory"] is False and fast["note"] == auto["note"]
    assert low["total_gb"] == auto["total_gb"] == fast["total_gb"]
    bad = CliRunner().invoke(app, ["estimate", "--model", str(tmp_path / "none")])
    assert bad.exit_code == 1 and "no such folder" in bad.output  # (#18: not the hub's words)


def test_cpu_pins_glibc_only_when_its_default_could_outgrow_the_ram():
    """CPU: the estimate is the live peak (thresholds pinned); glibc's default allocator may
    climb to the bound. Left to qorpo (None), the thresholds are pinned exactly when the bound
    does not fit the available RAM; asked for either way, they are as asked."""
    def cpu_plan(room: float | None, low: bool | None = None, ckpt: bool = True):
        cap = None if room is None else Capacity("cpu", room, "available RAM")
        return plan(SMOL, assumed_lengths(1024) * 2, device="cpu", batch_size=2,
                    layout="packed", max_length=1024, max_prompt_length=512, capacity=cap,
                    low_cpu_memory=low, checkpointing=ckpt, kernel="qorpo_pairs")

    ref = cpu_plan(None)
    live, bound = ref.peak.total, ref.default_bound
    assert bound > 1.5 * live  # checkpointing saves a lot: glibc may give much of it back
    assert not ref.low_cpu_memory  # no capacity known: nothing to decide on
    roomy, tight = cpu_plan(2 * bound), cpu_plan((live + bound) / 2)
    assert not roomy.low_cpu_memory and "between this estimate" in roomy.note
    assert tight.low_cpu_memory and tight.fits and "pinned" in tight.note
    assert not cpu_plan((live + bound) / 2, low=False).low_cpu_memory  # asked: kept
    assert cpu_plan(2 * bound, low=True).low_cpu_memory
    assert {roomy.peak.total, tight.peak.total} == {live}  # the same live estimate
    short = cpu_plan(live / 2)
    assert short.fits is False and short.low_cpu_memory and short.knobs  # pinned, and knobs
    unchecked = cpu_plan(None, ckpt=False)
    assert unchecked.default_bound > unchecked.peak.total > live
    gpu = plan(SMOL, assumed_lengths(1024), device="cuda", batch_size=1, layout="packed",
               max_length=1024, max_prompt_length=512)
    assert gpu.default_bound is None and not gpu.low_cpu_memory


def test_jemalloc_or_tcmalloc_need_no_bound_and_no_pinning():
    for name in ("jemalloc", "tcmalloc"):
        est = plan(SMOL, assumed_lengths(1024) * 2, device="cpu", batch_size=2, layout="packed",
                   max_length=1024, max_prompt_length=512, allocator=name,
                   capacity=Capacity("cpu", 0.1 * GIB, "available RAM"))
        assert est.default_bound is None and not est.low_cpu_memory and est.note == ""
        assert est.fits is False and est.knobs  # what does not fit is still said


def test_processes_of_one_launch_share_the_ram(monkeypatch):
    from qorpo.memory.plan import detect_capacity

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    one = detect_capacity("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    two = detect_capacity("cpu")
    assert one is not None and two is not None and "/ 2 processes" in two.source
    assert two.bytes == pytest.approx(one.bytes / 2, rel=0.05)  # (MemAvailable moves a bit)


JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


@pytest.mark.skipif(not JEMALLOC.exists(), reason="no libjemalloc.so.2 on this machine")
def test_a_preloaded_allocator_is_detected():
    code = "from qorpo.sysmem import allocator; print(allocator())"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"}
    glibc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, cwd=ROOT)
    je = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**env, "LD_PRELOAD": str(JEMALLOC)}, cwd=ROOT)
    assert glibc.stdout.strip() == "glibc" and je.stdout.strip() == "jemalloc", je.stderr


def test_train_pins_the_thresholds_when_the_estimate_says_so(tmp_path, monkeypatch):
    """qorpo train (auto) pins glibc's thresholds before the model loads, and says why, only
    when the default allocator's bound would not fit the available RAM."""
    from rich.console import Console

    import qorpo.api
    import qorpo.memory.training as mp  # (where a run asks for its capacity)
    from qorpo.api import train

    model = make_model(tmp_path / "m", arch="llama")
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    pins: list[bool] = []
    monkeypatch.setattr(qorpo.api, "pin_malloc_thresholds", lambda: pins.append(True) or True)
    kw = dict(model=str(model), data=str(data), max_length=48, min_response_tokens=2,
              batch_size=2, max_steps=1, save_steps=10**6)
    first = train(output_dir=str(tmp_path / "a"), console=Console(quiet=True), **kw)
    assert pins == [] and not first.memory.low_cpu_memory  # plenty of RAM here
    assert first.metrics["peak_memory_bound_gib"] > first.metrics["peak_memory_estimate_gib"]
    live, bound = first.memory.peak.total, first.memory.default_bound
    monkeypatch.setattr(mp, "detect_capacity", lambda device: Capacity(
        "cpu", (live + bound) / 2, "available RAM (test)"))
    console = Console(record=True, width=200)
    second = train(output_dir=str(tmp_path / "b"), console=console, **kw)
    assert pins == [True] and second.memory.low_cpu_memory
    assert "peak_memory_bound_gib" not in second.metrics
    said = " ".join(console.export_text().split())
    assert "thresholds are pinned (--low-cpu-memory)" in said


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

"""Resume exactness and the run's records across a resume (issue #18, items 9, 10, 16, 19).
In-process: each resume is a fresh train() call, as `qorpo train --resume` would be."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from qorpo.api import train
from tests.test_train import adapter_weights, base_kwargs, interrupt_at, write_pairs
from tests.tiny import make_model

# 12 pairs, 2 per micro-batch, 2 micro-batches per step: 3 optimizer steps per epoch.
EPOCHS, STEPS_PER_EPOCH = 3, 3
DEFAULTS = dict(max_steps=-1, epochs=float(EPOCHS), group_by_length=True, lora_dropout=0.05,
                warmup_ratio=0.1, save_steps=1, save_total_limit=100)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A 3-epoch run with the default sampler (grouped by length) and a checkpoint per step."""
    root = tmp_path_factory.mktemp("resume")
    model = make_model(root / "llama", arch="llama", tie=True)
    data = write_pairs(root / "pairs.jsonl", 12)
    straight = root / "straight"
    train(**base_kwargs(model, data, straight, **DEFAULTS))
    return root, model, data, straight


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_train_loss(out: Path) -> float:
    return [r for r in records(out) if "train_loss" in r][-1]["train_loss"]


# ----------------------------------------------------------------------------- 16. exactness
def test_16_resume_from_every_checkpoint_of_three_epochs_is_bit_identical(work):
    """The default --group-by-length sampler draws each epoch's order from (seed, epoch), so a
    resume inside epoch 2 or 3 sees the same batches as the unbroken run (it used to draw
    them from the global RNG as it stood at the resume, i.e. epoch 1's order again)."""
    root, model, data, straight = work
    last = EPOCHS * STEPS_PER_EPOCH
    assert sorted(int(p.name.split("-")[1]) for p in straight.glob("checkpoint-*")) == \
        list(range(1, last + 1))
    ref = adapter_weights(straight)
    assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)
    differ, partial_loss = [], []
    for k in range(1, last):
        out = root / f"from-{k}"
        train(**base_kwargs(model, data, out, **DEFAULTS,
                            resume=str(straight / f"checkpoint-{k}")))
        got = adapter_weights(out)
        assert got.keys() == ref.keys()
        if not all(torch.equal(got[name], ref[name]) for name in ref):
            differ.append(k)
        # 9. the last train_loss record covers the whole run, not only the resumed steps
        if not math.isclose(last_train_loss(out), last_train_loss(straight), rel_tol=1e-9):
            partial_loss.append(k)
    assert differ == [], f"resumed from checkpoint(s) {differ}: adapter differs"
    assert partial_loss == [], f"resumed from {partial_loss}: train_loss of the resumed steps"


def test_16_the_sampler_groups_by_length_with_an_order_fixed_by_seed_and_epoch():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from qorpo.trainer import EpochLengthGroupedSampler

    lengths = [int(x) for x in torch.randint(5, 200, (64,), generator=torch.Generator()
                                             .manual_seed(0))]
    epoch = [0]
    sampler = EpochLengthGroupedSampler(4, lengths, seed=42, epoch=lambda: epoch[0])
    orders = []
    for epoch[0] in (0, 1, 0):
        torch.manual_seed(epoch[0] + 7)  # the global RNG plays no part
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[1]) == list(range(64))
    # transformers' own grouping (megabatches sorted by length), only the shuffle is seeded
    epoch[0] = 1
    assert list(sampler) == get_length_grouped_indices(
        lengths, 4, generator=torch.Generator().manual_seed(43))


# ----------------------------------------------------------------------------- 9, 10. records
def test_9_10_resume_in_place_keeps_the_whole_run_loss_and_takes_new_logging_steps(
        work, monkeypatch):
    """Stopped at the checkpoint of step 2 (logging every 3 steps), resumed in the same folder
    with --logging-steps 1: every later step is logged (the checkpoint's trainer state used to
    bring back 3), and the final train_loss record is the whole run's."""
    root, model, data, straight = work
    out = root / "in-place"
    kw = dict(DEFAULTS, save_steps=2)
    with monkeypatch.context() as m:
        interrupt_at(m, 2, "on_save")
        with pytest.raises(KeyboardInterrupt):
            train(**base_kwargs(model, data, out, **kw, logging_steps=3))
    result = train(**base_kwargs(model, data, out, **kw, logging_steps=1, resume="latest"))
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [2, *range(3, EPOCHS * STEPS_PER_EPOCH + 1)]  # 2: the checkpoint's log
    assert math.isclose(last_train_loss(out), last_train_loss(straight), rel_tol=1e-6)
    assert math.isclose(result.metrics["train_loss"], last_train_loss(out), rel_tol=1e-9)
    assert torch.equal(adapter_weights(out)["base_model.model.model.layers.0.self_attn."
                                            "q_proj.lora_B.weight"],
                       adapter_weights(straight)["base_model.model.model.layers.0.self_attn."
                                                 "q_proj.lora_B.weight"])


# ----------------------------------------------------------------------------- 19. one step
def test_19_a_one_step_run_trains_at_a_nonzero_learning_rate(work, monkeypatch):
    """--max-steps 1 with the default 10% warm-up: the only step used to run at warm-up rate 0
    (the adapter stayed at its init, LoRA B all zero) and the run said done."""
    root, model, data, _ = work
    out = root / "one-step"
    import qorpo.api as qa
    from qorpo.trainer import EpochLengthGroupedSampler

    built = []
    real_build = qa.build_trainer
    monkeypatch.setattr(qa, "build_trainer", lambda *a, **k: built.append(real_build(*a, **k))
                        or built[-1])
    train(**base_kwargs(model, data, out, max_steps=1, warmup_ratio=0.1, group_by_length=True))
    # (16) the default --group-by-length run shuffles with the sampler above
    assert type(built[0].get_train_dataloader().batch_sampler.sampler) \
        is EpochLengthGroupedSampler
    logged = [r for r in records(out) if "loss" in r]
    assert len(logged) == 1 and logged[0]["learning_rate"] == pytest.approx(5e-3)
    b = [v for k, v in adapter_weights(out).items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)


@pytest.mark.slow
def test_16_two_process_resume_inside_epoch_two_is_bit_identical(work):
    """Under torchrun the resumed epoch's loader skips batches through accelerate's shard
    wrappers, which do not pass set_epoch on to the sampler: the sampler reads the epoch from
    the Trainer's state instead. 2 processes x 2 pairs: 3 steps per epoch, resumed at step 5."""
    from safetensors.torch import load_file

    from tests.test_distributed import launch

    root, model, data, _ = work
    args = ["--model", str(model), "--data", str(data), "--max-length", "48",
            "--max-prompt-length", "24", "--min-response-tokens", "2", "--batch-size", "2",
            "--grad-accum", "1", "--learning-rate", "5e-3", "--epochs", "2",
            "--save-steps", "1", "--save-total-limit", "10"]
    straight, resumed = root / "ddp-straight", root / "ddp-from-5"
    for out, extra in ((straight, []), (resumed, ["--resume", str(straight / "checkpoint-5")])):
        done = launch(2, "train", *args, "--output-dir", str(out), *extra)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

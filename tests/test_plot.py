"""Training curves (`qorpo plot`, qorpo.plot): a valid PNG naming its panels and runs in its
metadata, several runs overlaid, live runs, nothing overwritten that qorpo did not draw; and
TensorBoard event files with the same metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qorpo.plot import CURVES_FILE, PANELS, plot_finished_run, plot_runs, png_text, series
from tests.test_eval import cli

KEYS = [k for k, _ in PANELS]


def write_metrics(run: Path, steps: int, *, scale: float = 1.0, cut_last: bool = False) -> Path:
    """metrics.jsonl as qorpo train writes it: eval before (step 0), train every step, eval at
    the end, the closing train_loss record; optionally a live run's half-written last line."""
    run.mkdir(parents=True, exist_ok=True)

    def metrics(step: int, prefix: str = "") -> dict[str, float]:
        v = scale / (1 + step)
        return {f"{prefix}{k}": val for k, val in {
            "loss": 2 * v, "nll": 1.9 * v, "ratio_loss": v, "rewards/accuracy": 1 - v / 2,
            "rewards/margin": 0.1 - v / 10, "log_odds": 1 - v}.items()}

    lines = [{"step": 0, **metrics(0, "eval_")}]
    lines += [{"step": s, "learning_rate": 1e-4, **metrics(s)} for s in range(1, steps + 1)]
    lines += [{"step": steps, **metrics(steps, "eval_")},
              {"step": steps, "train_loss": 1.0, "train_runtime": 3.0}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if cut_last:
        text += '{"step": 99, "loss": 0.'  # the writer was mid-line
    (run / "metrics.jsonl").write_text(text)
    return run


def meta(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # a complete, valid PNG (checksums included)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 400
    return json.loads(png_text(path)["qorpo"])


def test_one_run_goes_into_its_folder(tmp_path):
    run = write_metrics(tmp_path / "run-a", 6, cut_last=True)
    result = cli("plot", run)
    assert result.exit_code == 0, result.output
    info = meta(run / CURVES_FILE)
    assert info["panels"] == KEYS and info["x"] == "optimizer step"
    counts = info["runs"]["run-a"]
    for key in KEYS:  # the cut line and the closing train_loss record are no points
        assert counts[key] == {"train": 6, "eval": 1, "eval_before": 1}, key


def test_several_runs_are_overlaid(tmp_path):
    a = write_metrics(tmp_path / "a", 4)
    b = write_metrics(tmp_path / "b", 8, scale=2.0)
    out = tmp_path / "compare.png"
    result = cli("plot", a, b, "--out", out)
    assert result.exit_code == 0, result.output
    info = meta(out)
    assert set(info["runs"]) == {"a", "b"}
    assert info["runs"]["b"]["loss"]["train"] == 8
    fig = plot_runs([a, b])  # the notebook's call: a Figure, one line per run and series
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes[:len(PANELS)]] == [t for _, t in PANELS]
    assert len(axes[0].get_lines()) == 2 * 3  # train, eval, eval-before star per run
    named = plot_runs([a, b], labels=["β 0.1", "β 1"])
    assert set(named._qorpo_meta["runs"]) == {"β 0.1", "β 1"}


def test_eval_before_is_step_zero(tmp_path):
    run = write_metrics(tmp_path / "r", 3)
    s = series(json_records(run), "rewards/accuracy")
    assert s["eval_before"] == [(0, 0.5)] and [p[0] for p in s["eval"]] == [3]


def json_records(run: Path) -> list[dict]:
    from qorpo.plot import read_metrics

    return read_metrics(run)


def test_nothing_is_overwritten_that_qorpo_did_not_draw(tmp_path):
    run = write_metrics(tmp_path / "run", 3)
    mine = tmp_path / "holiday.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    result = cli("plot", run, "--out", mine)
    assert result.exit_code == 1 and "not a qorpo plot" in result.output, result.output
    assert mine.read_bytes().endswith(b"not ours")
    assert cli("plot", run, "--out", mine, "--force").exit_code == 0
    assert cli("plot", run, "--out", mine).exit_code == 0  # our own plot: redrawn


def test_a_folder_without_metrics_is_one_line(tmp_path):
    result = cli("plot", tmp_path)
    assert result.exit_code == 1 and "no metrics.jsonl" in result.output
    assert "Traceback" not in result.output
    assert "no metrics.jsonl" in (plot_finished_run(tmp_path) or "")  # a note, not a failure


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_report_to_tensorboard_writes_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qorpo.api import train
    from tests.test_train import base_kwargs, write_pairs
    from tests.tiny import make_model

    model = make_model(tmp_path / "llama", arch="llama", tie=True)
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "run"
    train(**base_kwargs(model, data, out, max_steps=2, eval_fraction=0.25,
                        report_to=["tensorboard"]))
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in KEYS:
        assert f"train/{key}" in tags and f"eval/{key}" in tags, (key, sorted(tags))
    assert [e.step for e in acc.Scalars("train/rewards/accuracy")] == [1, 2]
    assert [e.step for e in acc.Scalars("eval/rewards/accuracy")][0] == 0  # before training

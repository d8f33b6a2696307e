"""`qorpo eval` on a tiny 4-bit model: the trainer's own eval numbers, the base loaded once for
a run and its checkpoint, a merged folder, bad input as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qorpo.api import train
from qorpo.cli.eval import eval_command
from qorpo.cli.plot import plot_command
from qorpo.evaluation import evaluate
from qorpo.evaluation.inputs import resolve
from qorpo.runs import CHECKPOINT_MARKER, CONFIG_FILE, METRICS_FILE
from tests.test_train import base_kwargs, write_pairs
from tests.tiny import make_model

# The commands as `qorpo` registers them (qorpo.cli.app); a local app keeps these tests
# independent of the registration, which test_commands_are_registered checks.
_app = typer.Typer()
_app.callback()(lambda: None)
_app.command("eval")(eval_command)
_app.command("plot")(plot_command)

METRICS = ("loss", "nll", "ratio_loss", "rewards/accuracy", "rewards/margin", "log_odds",
           "logps/chosen", "logps/rejected")


def cli(*args: str):
    return CliRunner().invoke(_app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run on the style pairs with a held-out quarter, evaluated by the trainer at steps 0, 4
    and 8, checkpointed at 4 and 8."""
    root = tmp_path_factory.mktemp("eval")
    model = make_model(root / "llama", arch="llama", tie=True)
    data = write_pairs(root / "pairs.jsonl", 48)
    out = root / "run"
    train(**base_kwargs(model, data, out, max_steps=8, eval_fraction=0.25, eval_steps=4,
                        save_steps=4, save_total_limit=None))
    return root, model, data, out


@pytest.fixture(scope="module")
def scored(run):
    root, _, _, out = run
    result = cli("eval", out, "--adapter", out / "checkpoint-4", "--json", "--generate", "2",
                 "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def trainer_evals(out: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    return {r["step"]: {k[5:]: v for k, v in r.items() if k.startswith("eval_")}
            for r in records if "eval_loss" in r}


def test_eval_agrees_with_the_trainers_own_eval(run, scored):
    _, _, _, out = run
    evals = trainer_evals(out)
    base, tuned, ckpt = scored["models"]
    assert base["adapter"] is None and scored["pairs"] == 12  # a quarter of 48, as trained
    # same pairs, same loss path: the base is the eval before training (LoRA B = 0), the run
    # is its final eval, the checkpoint its eval at step 4
    for mine, theirs in ((base, evals[0]), (tuned, evals[8]), (ckpt, evals[4])):
        for key in METRICS:
            assert math.isclose(mine["metrics"][key], theirs[key], rel_tol=1e-6,
                                abs_tol=1e-7), (mine["name"], key)


def test_an_adapter_trained_on_the_style_pairs_scores_higher(scored):
    base, tuned, ckpt = scored["models"]
    for m in (tuned, ckpt):
        assert m["metrics"]["rewards/accuracy"] > base["metrics"]["rewards/accuracy"]
        assert m["delta"]["rewards/margin"] > 0 and m["delta"]["log_odds"] > 0
        assert m["delta"]["nll"] < 0
    assert tuned["metrics"]["rewards/margin"] > ckpt["metrics"]["rewards/margin"]
    # greedy replies: one per model, per prompt
    assert len(scored["generations"]) == 2
    assert set(scored["generations"][0]) == {"prompt", base["name"], tuned["name"], ckpt["name"]}


def test_the_table_shows_base_and_adapters_side_by_side(run):
    _, model, data, out = run
    result = cli("eval", model, "--adapter", out, "--data", data, "--max-samples", "4",
                 "--max-length", "48", "--max-prompt-length", "24", "--min-response-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "4 pairs scored" in result.output and "reward accuracy" in result.output
    assert "(+" in result.output and "difference to the base" in result.output


def test_a_merged_folder_scores_as_base_plus_adapter(run):
    from qorpo.merging import merge

    root, model, data, out = run
    merged = merge(out, root / "merged", verify=False).out_dir
    common = dict(data=str(data), eval_fraction=0.25, max_length=48, max_prompt_length=24,
                  min_response_tokens=2, quant="none")
    plain = evaluate(str(model), [str(out)], **common)
    folder = evaluate(str(merged), **common)
    assert folder.pairs == plain.pairs == 12
    for key in METRICS:  # the delta added into the weights = the adapter on top of them
        assert math.isclose(folder.models[0]["metrics"][key], plain.models[1]["metrics"][key],
                            rel_tol=1e-4, abs_tol=1e-5), key


def test_bad_input_is_one_line(run, tmp_path):
    root, model, data, out = run
    cases = {
        ("eval", model): "give --data",  # a base model alone has no eval set of its own
        ("eval", model, "--data", tmp_path / "missing.jsonl"): "missing.jsonl",
        ("eval", model, "--adapter", root, "--data", data): "holds no adapter",
        ("eval", tmp_path): "neither a model folder",
        ("eval", model, "--adapter", out, "--adapter", out, "--data", data): "given twice",
        ("eval", out, "--quant", "3bit"): "quant",
        ("eval", out, "--max-samples", "0"): "at least 1",
    }
    for args, expected in cases.items():
        result = cli(*args)
        assert result.exit_code in (1, 2), (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, result.output


def test_a_checkpoint_cut_short_is_refused(run, tmp_path):
    import shutil

    _, _, _, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "checkpoint-4" / CHECKPOINT_MARKER).unlink()
    result = cli("eval", copy / "checkpoint-4")
    assert result.exit_code == 1 and "cut short" in result.output, result.output


def test_run_settings_never_turn_on_remote_code(run, tmp_path):
    import shutil

    _, _, _, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    text = (copy / CONFIG_FILE).read_text().replace("trust_remote_code: false",
                                                    "trust_remote_code: true")
    (copy / CONFIG_FILE).write_text(text)
    assert resolve(str(copy), [], {}).cfg.trust_remote_code is False
    assert resolve(str(copy), [], {"trust_remote_code": True}).cfg.trust_remote_code is True


def test_what_is_scored_follows_the_run_unless_data_is_given(run, tmp_path):
    import shutil

    from qorpo.evaluation.inputs import scored_set

    _, _, data, out = run
    cfg = resolve(str(out), [], {}).cfg
    assert scored_set(cfg) == (cfg, True) and cfg.eval_fraction == 0.25  # the held-out rows
    assert (cfg.max_length, cfg.max_prompt_length, cfg.batch_size) == (48, 24, 2)  # the run's
    given = resolve(str(out), [], {"data": str(data)}).cfg  # --data: all of it, own settings
    assert given.eval_fraction == 0 and scored_set(given) == (given, False)
    assert given.max_length == 48  # scoring settings still the run's
    copy = tmp_path / "run"  # a run with a separate eval file: only that file is read
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    text = (copy / CONFIG_FILE).read_text().replace("eval_fraction: 0.25", "eval_fraction: 0.0")
    (copy / CONFIG_FILE).write_text(text.replace("eval_data: null", "eval_data: held.jsonl"))
    cfg, held_out = scored_set(resolve(str(copy), [], {}).cfg)
    assert (cfg.data, cfg.eval_data, held_out) == ("held.jsonl", None, False)


def test_commands_are_registered():
    from qorpo.cli import app

    names = {c.name for c in app.registered_commands}
    assert {"eval", "plot"} <= names

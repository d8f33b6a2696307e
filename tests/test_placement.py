"""One placement (qorpo.data.placement) for the collator and the memory plan, and `qorpo estimate`
as one config object (qorpo.memory.options.EstimateConfig) behind its flags and its Python API."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qorpo.cli import app
from qorpo.config import TrainConfig, default_max_prompt_length
from qorpo.data.collate import PAD, PairCollator, build_batch
from qorpo.data.placement import (
    LAYOUTS,
    PAD_MULTIPLE,
    place,
)
from qorpo.errors import ConfigError
from qorpo.memory.options import EstimateConfig
from qorpo.memory.plan import estimate_run, workload

ROOT = Path(__file__).resolve().parents[1]
KERNELS = (None, "sdpa", "qorpo_pairs", "flex_attention")  # None/sdpa: a dense mask


def random_lengths(rng: random.Random) -> list[tuple[int, int, int]]:
    """1 to 11 pairs of odd sizes: one-token parts, long prompts, long responses."""

    def one() -> int:
        return rng.choice([1, 1, 2, 3, rng.randint(1, 40), rng.randint(40, 700)])

    return [(one(), one(), one()) for _ in range(rng.randint(1, 11))]


# ----------------------------------------------------------------------------- placement
def test_importing_the_placement_loads_no_torch():
    code = "import sys, qorpo.data.placement\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_collator_and_memory_plan_place_pairs_alike(layout):
    """The batch the collator builds and the workload the plan estimates: the same rows, row
    length, positions, input tokens and scored tokens, on random lengths, for every kernel
    (packed rows are as long as the model width and kernel make them), sft_on_prompt on/off."""
    rng = random.Random(LAYOUTS.index(layout))
    for trial in range(60):
        lengths = random_lengths(rng)
        sft, kernel = bool(trial % 2), KERNELS[trial % len(KERNELS)]
        hidden = rng.choice([64, 576, 4096])
        skips = kernel in ("qorpo_pairs", "flex_attention")
        cost = 0.0 if skips else 1 / (6 * hidden)  # what the trainer passes (attention.cost)
        pairs = [([5] * p, [6] * c, [7] * r) for p, c, r in lengths]
        batch = PairCollator(0, layout=layout, sft_on_prompt=sft, attention_cost=cost).batch(
            [{"chosen_input_ids": p + c, "rejected_input_ids": p + r,
              "chosen_response_start": len(p), "rejected_response_start": len(p)}
             for p, c, r in pairs])
        work = workload(lengths, layout, sft_on_prompt=sft, hidden=hidden, kernel=kernel)
        where = place(lengths, layout, sft_on_prompt=sft, pad_to_multiple_of=PAD_MULTIPLE,
                      attention_cost=cost)
        rows, length = batch.input_ids.shape
        said = (trial, lengths, sft, kernel)
        assert (work.rows, work.length) == (rows, length) == (where.rows, where.length), said
        assert work.tokens == rows * length == where.tokens, said
        assert work.scored == batch.score_index.numel() == where.scored_tokens, said
        assert int((batch.part != PAD).sum()) == where.input_tokens, said
        assert int(batch.score_sft.sum()) == where.sft_tokens, said
        # scored tokens, counted by hand: every response token, plus the chosen prompt's tokens
        # after the first with sft_on_prompt
        assert work.scored == sum(c + r + (p - 1 if sft else 0) for p, c, r in lengths), said
        assert length % PAD_MULTIPLE == 0, said


@pytest.mark.parametrize("layout", LAYOUTS)
def test_placement_puts_every_token_once_and_in_its_row(layout):
    """Naive reference: each pair's runs are where the layout says (padded: chosen on row i,
    rejected on row B+i from column 0; shared/packed: prompt|chosen|rejected contiguous), no
    two tokens share a cell, rows hold what the placement counts, shared rows hold one pair."""
    rng = random.Random(11)
    for trial in range(80):
        lengths = random_lengths(rng)
        multiple = rng.choice([1, 3, 8])
        cap = None if trial % 3 else max(p + c + r for p, c, r in lengths) + rng.randint(0, 50)
        where = place(lengths, layout, pad_to_multiple_of=multiple,
                      max_row_tokens=cap if layout == "packed" else None)
        cells: set[tuple[int, int]] = set()
        b = len(lengths)
        for i, ((p, c, r), s) in enumerate(zip(lengths, where.pairs, strict=True)):
            runs = [(s.prompt, p), (s.chosen, c), (s.rejected, r)]
            if layout == "padded":
                runs.append((s.rejected_prompt, p))
                assert s.prompt == (i, 0) and s.chosen == (i, p), trial
                assert s.rejected_prompt == (b + i, 0) and s.rejected == (b + i, p), trial
                assert (s.chosen_segment, s.rejected_segment) == (i, b + i)
            else:
                assert s.rejected_prompt == s.prompt and (s.chosen_segment,
                                                          s.rejected_segment) == (i, i)
                assert s.chosen == (s.prompt.row, s.prompt.start + p), trial
                assert s.rejected == (s.prompt.row, s.prompt.start + p + c), trial
                if layout == "shared":
                    assert s.prompt == (i, 0), trial
            for seat, n in runs:
                new = {(seat.row, seat.start + k) for k in range(n)}
                assert not new & cells, (trial, i)
                assert all(0 <= col < where.length for _, col in new), (trial, i)
                cells |= new
        assert len(cells) == where.input_tokens and where.length % multiple == 0
        assert {row for row, _ in cells} == set(range(where.rows))  # no empty row
        longest = max(sum(1 for row, _ in cells if row == k) for k in range(where.rows))
        assert where.length == -(-longest // multiple) * multiple  # the longest row, rounded
        if layout == "packed" and cap is not None:
            assert longest <= cap
        assert where.unique_tokens == sum(p + c + r for p, c, r in lengths)


def test_placement_refuses_what_cannot_be_laid_out():
    with pytest.raises(ValueError, match="layout must be one of"):
        place([(1, 1, 1)], "diagonal")
    with pytest.raises(ValueError, match="no pairs"):
        place([], "padded")
    with pytest.raises(ValueError, match="more than max_row_tokens=10"):
        place([(5, 5, 5)], "packed", max_row_tokens=10)
    with pytest.raises(ValueError, match="at least one token each"):  # the collator's rule
        build_batch([([], [1], [2])], "shared")


def test_pad_to_8_and_half_of_max_length_are_each_one_fact():
    assert PairCollator(0).multiple == PAD_MULTIPLE == 8
    for n in (1, 2, 3, 64, 1023, 1024, 4097):
        cfg = TrainConfig(max_length=n)
        assert default_max_prompt_length(n) == cfg.resolved_max_prompt_length == max(1, n // 2)


# ----------------------------------------------------------------------------- EstimateConfig
def _config_folder(path: Path, context: int = 8192) -> Path:
    """A config.json alone (no weights): all `qorpo estimate` reads."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                max_position_embeddings=context).save_pretrained(path)
    return path


def test_estimate_config_from_dict_parses_and_lists_every_problem():
    cfg = EstimateConfig.from_dict({"model": "m", "max-length": "512", "batch_size": "2",
                                    "packing": "false", "low_cpu_memory": "yes",
                                    "gpu_memory": "16GB", "device": "cuda"})
    assert (cfg.max_length, cfg.batch_size, cfg.packing, cfg.low_cpu_memory) == (512, 2,
                                                                                  False, True)
    assert cfg.layout == "padded" and EstimateConfig(model="m").layout == "packed"
    with pytest.raises(ConfigError) as bad:
        EstimateConfig.from_dict({"max_length": 0, "batch_size": -1, "lora_r": 0,
                                  "device": "tpu", "gpu_memory": "lots"})
    problems = bad.value.problems
    assert [p.split(":")[0] for p in problems] == ["model", "max_length", "batch_size",
                                                   "lora_r", "device", "gpu_memory"], problems
    assert "must be at least 1, got -1" in problems[2] and "'tpu'" in problems[4]
    with pytest.raises(ConfigError, match="did you mean max_length"):
        EstimateConfig.from_dict({"model": "m", "max_len": 5})
    # estimate_run validates a config built by hand as well
    with pytest.raises(ConfigError, match="batch_size: must be at least 1"):
        estimate_run(EstimateConfig(model="m", batch_size=0))


def test_estimate_flags_are_the_config_fields():
    out = CliRunner().invoke(app, ["estimate", "--help"], terminal_width=200).output
    for f in dataclasses.fields(EstimateConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert EstimateConfig().lora_r == TrainConfig().lora_r  # qorpo train's defaults
    assert EstimateConfig().packing is TrainConfig().packing


@pytest.mark.parametrize("values", [
    {"gpu_memory": "8GB"},
    {"gpu_memory": "24GB", "max_length": 2048, "batch_size": 3, "packing": False, "lora_r": 8},
    {"device": "cpu", "low_cpu_memory": True, "max_length": 300}])
def test_estimate_cli_and_api_agree(tmp_path, values):
    folder = _config_folder(tmp_path / "m")
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--no-{k.replace('_', '-')}"
             if v is False else f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    out = CliRunner().invoke(app, ["estimate", "--model", str(folder), "--json", *flags])
    assert out.exit_code == 0, out.output
    api = estimate_run(EstimateConfig(model=str(folder), **values)).to_json()
    cli = json.loads(out.output)
    if values.get("device") == "cpu":  # the RAM available moves between the two calls
        for key in ("capacity_gb", "headroom_gb", "largest"):
            cli.pop(key), api.pop(key)
    assert cli == json.loads(json.dumps(api)), flags
    assert cli["model"] == str(folder) and cli["total_gb"] > 0
    assert cli["device"] == values.get("device", "cuda")

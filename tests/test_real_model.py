"""The real SmolLM2-135M-Instruct, end to end: 4-bit ORPO on real preference data, merge with
verification, and generation from the merged folder with plain transformers.

Skipped only when the demo wheel cannot be fetched (no package registry).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qorpo.cli import app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dpo_en_demo.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from qorpo.demo import DemoUnavailableError, ensure_demo_model

    try:
        return ensure_demo_model()
    except DemoUnavailableError as exc:  # no registry: nothing to test against
        pytest.skip(f"demo model unavailable: {exc}")


def test_train_merge_generate_real_model(smollm2, tmp_path):
    torch.set_num_threads(2)  # a real model: the second core pays off here
    if SHARED.exists():
        data, extra = SHARED, ["--max-samples", "40"]
    else:
        from qorpo.demo import demo_data_files

        data, extra = demo_data_files().train, []
    out = tmp_path / "run"
    args = ["train", "--model", str(smollm2), "--data", str(data), "--output-dir", str(out),
            "--max-length", "128", "--max-prompt-length", "64", "--max-steps", "3",
            "--batch-size", "1", "--grad-accum", "2", "--logging-steps", "1",
            "--learning-rate", "1e-4", *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rows read" in result.output and "rows kept" in result.output  # the drop table
    assert "Parity check passed" in result.output
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)

    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(out), "--out", str(merged), "--verify"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # "greedy agreement=…" (the table may wrap the cell between the two words: long tmp paths)
    assert "agreement=" in result.output

    # plain transformers, no qorpo, no peft: the reply ends at the end-of-turn token
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    limit = 64
    gen = model.generate(**ids, max_new_tokens=limit, do_sample=False)
    new = gen[0, ids["input_ids"].shape[1]:].tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in new and len(new) < limit, tok.decode(new)
    assert "Paris" in tok.decode(new, skip_special_tokens=True)

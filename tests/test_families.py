"""The families people fine-tune, each through the whole journey on a tiny random model: two
training steps in the default layout equal to the padded layout, `qorpo merge` with default
options verified, and a GGUF exported and verified from it. docs/families.md's table is what
these tests show (test_docs checks that it names exactly these families)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from qorpo.api import train
from tests.test_gguf_families import FAMILIES, family_model
from tests.test_train import adapter_weights, base_kwargs, write_pairs

ROOT = Path(__file__).resolve().parents[1]
# the three families the rest of the suite uses throughout, plus every one test_gguf_families
# builds (MoE, soft-caps, sliding windows, partial rotary, fused QKV, logit scales, QK norms)
JOURNEY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    # Mistral v0.2+ (no window): a window is not written to GGUF (llama.cpp's converter does
    # not either), so a binding one would fail the GGUF check; training with windows:
    # tests/test_sliding_window.py
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    **FAMILIES,
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # long enough that packed rows pass Gemma 2/3's window of 8
    return write_pairs(tmp_path_factory.mktemp("journey") / "pairs.jsonl", 8)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", list(JOURNEY))
def test_family_trains_exactly_merges_and_exports(tmp_path: Path, pairs: Path,
                                                  family: str) -> None:
    from qorpo.merging import merge

    model = family_model(tmp_path / "model", family, spec=JOURNEY[family])
    losses = {}
    for layout, flags in (("default", {}), ("padded", {"prefix_sharing": False})):
        # SGD, not AdamW: Adam divides by |g|, so a 1e-9 difference in a near-zero gradient
        # moves a weight by up to the learning rate, hiding what is compared
        result = train(console=Console(quiet=True), **base_kwargs(
            model, pairs, tmp_path / layout, max_steps=2, optim="sgd", **flags))
        losses[layout] = result.metrics["train_loss"]
    assert losses["default"] == pytest.approx(losses["padded"], abs=1e-5)
    a, b = adapter_weights(tmp_path / "default"), adapter_weights(tmp_path / "padded")
    assert a.keys() == b.keys() and a
    # LoRA's B starts at 0: two steps must have moved it, or nothing was compared
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)
    for key in a:  # SGD: an update is linear in the gradient, so equal stays equal
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    merged = merge(tmp_path / "default", tmp_path / "merged", dtype="fp32", gguf="f16")
    assert merged.verification is not None and merged.verification.passed
    report = merged.gguf.verification
    assert report is not None and report.passed, report.summary()
    # the file holds exactly the f16-rounded weights: its gap is the rounding's, no more (the
    # logits of these tiny models stay below ~10; the tolerances are 1e-5 of that)
    assert report.exact_gap <= 1e-4
    assert report.max_abs <= 1.01 * report.rounding_gap + 1e-4


def test_the_docs_table_names_exactly_the_tested_families() -> None:
    text = (ROOT / "docs" / "families.md").read_text()
    table = text.split("<!-- families -->")[1]
    named = re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.MULTILINE)
    assert named == list(JOURNEY)

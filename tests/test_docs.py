"""Docs that cannot drift: the option reference, the memory table, flags named in the guide,
the example configs; plus sanity checks of the memory formula."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import typing
from pathlib import Path
from types import ModuleType

import pytest

from qorpo.config import TrainConfig
from qorpo.memory import GIB, MODELS, ModelShape, estimate, shape_from_config
from qorpo.memory.table import markdown_tables, max_pairs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load_script(name: str) -> ModuleType:
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"qorpo_scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- options.md


def test_options_md_is_generated_from_trainconfig():
    gen = load_script("gen_docs")
    assert (DOCS / "options.md").read_text() == gen.render(), (
        "docs/options.md is stale: run python scripts/gen_docs.py")


def test_options_md_lists_every_field_with_its_default():
    text = (DOCS / "options.md").read_text()
    for f in dataclasses.fields(TrainConfig):
        assert f"`--{f.name.replace('_', '-')}`" in text, f.name


# ----------------------------------------------------------------------------- flags in docs

# Flags the guide may name that are not TrainConfig fields, each for a reason.
CLI_FLAGS = {"--dry-run", "--help", "--debug", "--version", "--json"}  # train, estimate, qorpo
MERGE_FLAGS = {"--out", "--base", "--dtype", "--into", "--method", "--max-shard-size",
               "--verify", "--no-verify", "--force", "--allow-pickle",
               "--trust-remote-code"}  # qorpo merge (merge.md)
OTHER_TOOLS = {"--index-url", "--num_processes", "--config_file", "--multi_gpu", "--cpu",  # pip,
               "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr",  # accelerate,
               "--master_port", "--logdir"}  # torchrun, tensorboard
# scripts/memory_table.py, gen_docs.py, bench_scale.py, bench_speed.py, bench_allocators.py
SCRIPT_FLAGS = {"--check", "--no-write", "--fsdp", "--device", "--preset", "--malloc", "--quick",
                "--models", "--lengths", "--repeats", "--threads", "--variants"}

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")


def command_flags() -> set[str]:
    """Every option of every `qorpo` command (eval, plot, ...), as the CLI itself declares it."""
    import typer

    from qorpo.cli import app

    flags = {"--help"}
    for command in typer.main.get_command(app).commands.values():
        for param in command.params:
            flags |= {o for o in [*param.opts, *param.secondary_opts] if o.startswith("--")}
    return flags


def train_flags() -> set[str]:
    flags = set()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        flags.add(flag)
        if hints[f.name] is bool or bool in typing.get_args(hints[f.name]):  # also bool | None
            flags.add("--no-" + flag[2:])
    return flags


@pytest.mark.parametrize("doc", ["guide.md", "memory.md", "eval.md"])
def test_every_flag_in_the_docs_exists(doc):
    known = train_flags() | CLI_FLAGS | MERGE_FLAGS | OTHER_TOOLS | SCRIPT_FLAGS | command_flags()
    found = set(FLAG.findall((DOCS / doc).read_text()))
    assert found, "the pattern found no flags at all"
    assert found - known == set(), f"{doc} names flags that qorpo does not have"


def test_flag_whitelist_is_not_stale():
    # a whitelisted merge flag must still be a merge option (docs name them by hand,
    # the CLI is not: check the CLI itself)
    from typer.testing import CliRunner

    from qorpo.cli import app

    help_text = CliRunner().invoke(app, ["merge", "--help"], terminal_width=200).output
    plain = re.sub(r"\x1b\[[0-9;]*m", "", help_text)
    for flag in MERGE_FLAGS:
        assert flag in plain, flag
    for command in ("train", "estimate"):  # --json on both
        out = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert "--json" in re.sub(r"\x1b\[[0-9;]*m", "", out), command


# ----------------------------------------------------------------------------- examples


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_yaml_loads(path):
    cfg = TrainConfig.load(path)
    assert cfg.model and cfg.data and cfg.output_dir.startswith("runs/")


def test_the_three_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"mistral7b_ultrafeedback.yaml",
                                          "llama3_8b_instruct_t4.yaml",
                                          "dpo_en_demo_smollm2.yaml"}


def test_t4_example_fits_a_t4_by_the_estimate():
    cfg = TrainConfig.load(ROOT / "examples" / "llama3_8b_instruct_t4.yaml")
    assert (cfg.batch_size, cfg.grad_accum, cfg.max_length, cfg.max_prompt_length,
            cfg.dtype) == (1, 8, 1024, 512, "fp16")
    assert max_pairs("Llama-3.1-8B", cfg.max_length, 16) >= cfg.batch_size


def test_dpo_en_demo_example_data_loads(tmp_path, monkeypatch):
    """Dry run of the example against its real data file, with a tiny model in place of the demo
    model (no weights are loaded in a dry run; the tokenizer is tiny and offline)."""
    data = ROOT / "../shared/data/dpo_en_demo.json"
    if not data.is_file():
        pytest.skip("shared/data/dpo_en_demo.json is not next to this checkout")
    from qorpo.api import train
    from tests.tiny import make_model

    monkeypatch.chdir(ROOT)  # the example's data path is relative to the repository root
    model = make_model(tmp_path / "tiny")
    res = train(ROOT / "examples" / "dpo_en_demo_smollm2.yaml", dry_run=True, model=str(model),
                output_dir=str(tmp_path / "out"))
    assert res.metrics["steps"] >= 1


# ----------------------------------------------------------------------------- memory.md


def test_memory_md_table_matches_the_script():
    script = load_script("memory_table")
    text = (DOCS / "memory.md").read_text()
    assert script.doc_table(text) == markdown_tables(), (
        "docs/memory.md is stale: run python scripts/memory_table.py")
    assert script.main(["--check"]) == 0


def test_memory_md_says_what_its_numbers_are():
    text = (DOCS / "memory.md").read_text()
    assert "Estimates (formula in qorpo/memory/formula.py), not measurements." in text
    assert "not yet measured on a\n  GPU" in text  # the CUDA side, until a GPU run fills it


def test_estimate_grows_with_tokens_pairs_and_model_size():
    for name in MODELS:
        totals = [estimate(name, t).total for t in (512, 1024, 2048, 4096)]
        assert totals == sorted(totals) and len(set(totals)) == 4, name
        by_pairs = [estimate(name, 1024, pairs=p).total for p in (1, 2, 4)]
        assert by_pairs == sorted(by_pairs) and len(set(by_pairs)) == 3, name
    sizes = [estimate(n, 2048).total for n in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B")]
    assert sizes == sorted(sizes)


def test_naive_logits_dwarf_the_chunked_loss_at_128k_vocab():
    # naive / chunked = 2·T·V·10 bytes / (256·V·12 bytes): grows with tokens, not with vocab
    ratios = {}
    for t in (1024, 4096):
        est = estimate("Llama-3.1-8B", t)
        chunk_buffers = est.loss_path - 3 * 2 * t * 4096 * 4  # minus the hidden-state terms
        ratios[t] = est.naive_logits / chunk_buffers
    assert ratios[1024] > 5 and ratios[4096] > 25
    assert estimate("Llama-3.1-8B", 4096).naive_logits > 9 * GIB  # more than the whole model


def test_component_formulas():
    m = MODELS["Mistral-7B-v0.1"]
    assert abs(m.params - 7.24e9) < 0.01e9  # Mistral-7B-v0.1 has 7.24 B parameters
    assert abs(MODELS["Llama-3.1-8B"].params - 8.03e9) < 0.01e9
    assert m.lora_params(16) == 41_943_040  # what peft reports for r=16, all-linear
    est = estimate(m, 1024)
    # 4-bit NF4 with double quant: ~0.516 bytes per quantised weight
    assert est.quantized_weights / m.linear_params == pytest.approx(0.5 + 1 / 64, abs=1e-3)
    # fp32 LoRA weights and grads, 8-bit Adam (~2 bytes/param) vs torch AdamW (8 bytes/param)
    assert est.lora_params == est.lora_grads == 4 * m.lora_params(16)
    adamw = estimate(m, 1024, optim="adamw_torch")
    assert adamw.optimizer_states == pytest.approx(4 * est.optimizer_states, rel=0.05)
    # checkpoints: one 16-bit hidden state per layer per token
    assert est.checkpoints == m.layers * 2 * 1024 * m.hidden * 2
    # chunk size only moves the loss buffers
    small = estimate(m, 1024, chunk_size=64)
    assert small.loss_path < est.loss_path and small.checkpoints == est.checkpoints


def test_tied_embeddings_count_once():
    untied = dataclasses.replace(MODELS["Llama-3.2-1B"], tied=False)
    assert untied.params - MODELS["Llama-3.2-1B"].params == 128256 * 2048


def test_shape_from_config_matches_the_table_data():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                      vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False)
    shape = shape_from_config(cfg, "Llama-3.1-8B")
    assert shape == MODELS["Llama-3.1-8B"]
    assert isinstance(shape, ModelShape)


def test_max_pairs_is_consistent_with_estimate():
    for gb in (8, 12, 16, 24):
        n = max_pairs("Llama-3.1-8B", 1024, gb)
        limit = gb * GIB * 0.94
        if n:
            assert estimate("Llama-3.1-8B", 1024, pairs=n).total <= limit
        assert estimate("Llama-3.1-8B", 1024, pairs=n + 1).total > limit


# ----------------------------------------------------------------------------- links


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", ["guide.md", "memory.md", "options.md"])
def test_relative_links_and_anchors_resolve(doc):
    text = (DOCS / doc).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (DOCS / path).resolve() if path else DOCS / doc
        assert file.exists(), f"{doc}: broken link {target}"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{doc}: no anchor {target}"


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes >= 2 and cfg.mixed_precision == "no"  # qorpo picks the dtype
    assert str(path.relative_to(ROOT)) in (ROOT / "docs" / "guide.md").read_text()

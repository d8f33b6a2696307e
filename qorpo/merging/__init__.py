"""Merging a LoRA adapter into its base model: ``merge()`` (see run.py and docs/merge.md).

Modules, each importing only those listed before it:
checkpoint.py  read base/adapter tensors without loading the model; locate the base
remote.py      custom model code (auto_map): refused unless trust_remote_code, never prompted
identity.py    the architecture the adapter was trained on (a merge onto another is refused)
options.py     MergeConfig: the options (CLI flags, API keywords, docs), torch-free
adapter.py     parse an adapter into LoRA modules; the delta algebra and peft's scaling
experts.py     MoE expert parameters (peft target_parameters) -> per-tensor LoRA pieces
plan.py        which output tensor comes from what (ties, NF4 round trip, replacements)
shards.py      write planned safetensors shards; output-folder checks; atomic staging
methods.py     stream (tensor by tensor) and full (peft merge_and_unload) -> Merged
output.py      config, generation config, tokenizer and model card of the merged folder
verify.py      merged logits vs base + adapter, with a measured tolerance
summary.py     what the check means: a weak check, the distance to the trained model
run.py         merge(): the steps above in order -> MergeResult; with gguf=, qorpo.export's
               export_gguf() into the staging folder before the rename
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qorpo.merging.options import MergeConfig

if TYPE_CHECKING:
    from qorpo.merging.run import MergeResult, merge

__all__ = ["MergeConfig", "MergeResult", "merge"]


def __getattr__(name: str) -> Any:
    """``merge`` and ``MergeResult`` load torch: imported on first use, so that the CLI's
    option definitions (qorpo.merging.options) stay torch-free."""
    if name in ("merge", "MergeResult"):
        from qorpo.merging import run

        return getattr(run, name)
    raise AttributeError(f"module 'qorpo.merging' has no attribute {name!r}")

"""Merging a LoRA adapter into its base model: ``merge()`` (see run.py and docs/merge.md).

Modules, each importing only those listed before it:
checkpoint.py  read base/adapter tensors without loading the model; locate the base
adapter.py     parse an adapter into LoRA modules; the delta algebra and peft's scaling
plan.py        which output tensor comes from what (ties, NF4 round trip, replacements)
shards.py      write planned safetensors shards; output-folder checks; atomic staging
methods.py     stream (tensor by tensor) and full (peft merge_and_unload) -> Merged
output.py      config, generation config, tokenizer and model card of the merged folder
verify.py      merged logits vs base + adapter, with a measured tolerance
run.py         merge(): the steps above in order -> MergeResult; with gguf=, qorpo.export's
               export_gguf() into the staging folder before the rename
"""

from qorpo.merging.run import MergeResult, merge

__all__ = ["MergeResult", "merge"]

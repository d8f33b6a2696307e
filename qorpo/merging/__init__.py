"""Merging a LoRA adapter into its base model: ``merge()`` (see run.py and docs/merge.md).

Modules, each importing only those listed before it:
checkpoint.py  read base/adapter tensors without loading the model; locate the base
remote.py      custom model code (auto_map): refused unless trust_remote_code, never prompted
identity.py    the architecture the adapter was trained on (a merge onto another is refused)
adapter.py     parse an adapter into LoRA modules; the delta algebra and peft's scaling
plan.py        which output tensor comes from what (ties, NF4 round trip, replacements)
shards.py      write planned safetensors shards; output-folder checks; atomic staging
methods.py     stream (tensor by tensor) and full (peft merge_and_unload) -> Merged
output.py      config, generation config, tokenizer and model card of the merged folder
verify.py      merged logits vs base + adapter, with a measured tolerance
summary.py     what the check means: a weak check, the distance to the trained model
run.py         merge(): the steps above in order -> MergeResult; with gguf=, qorpo.export's
               export_gguf() into the staging folder before the rename
"""

from qorpo.merging.run import MergeResult, merge

__all__ = ["MergeResult", "merge"]

"""Files for runtimes other than transformers: one GGUF file for llama.cpp, Ollama and LM Studio,
with an Ollama Modelfile (``export_gguf``; ``qorpo merge --gguf`` calls it; docs/merge.md).

Modules, each importing only those listed before it:
vocab.py   tokenizer metadata (vocab, merges, pre-tokenizer, special ids, template), Modelfile
gguf.py    supported architectures, hyper-parameters, tensor plan, the streaming writer
verify.py  read the file back with transformers' GGUF loader and compare with the HF model
run.py     export_gguf(): check -> write under a temp name -> verify -> rename -> GGUFResult
"""

from qorpo.export.run import GGUFResult, export_gguf

__all__ = ["GGUFResult", "export_gguf"]

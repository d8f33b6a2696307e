"""Files for runtimes other than transformers: one GGUF file for llama.cpp, Ollama and LM Studio,
with an Ollama Modelfile (``export_gguf``; ``qorpo merge --gguf`` calls it; docs/merge.md).

Modules, each importing only those listed before it:
vocab.py     tokenizer metadata (BPE or SentencePiece vocab, special ids, template), Modelfile
families.py  supported architectures and their llama.cpp quirks (layout, extra keys, refusals)
hparams.py   config.json -> the GGUF header's hyper-parameters
gguf.py      tensor plan (names, types, transforms) and the streaming writer
readback.py  the independent read-back (tensors -> HF model class) and the metadata comparison
verify.py    read the file back (transformers' GGUF loader, or readback.py) and compare logits
run.py       export_gguf(): check -> write under a temp name -> verify -> rename -> GGUFResult
"""

from qorpo.export.run import GGUFResult, export_gguf

__all__ = ["GGUFResult", "export_gguf"]

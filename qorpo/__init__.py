"""qorpo: low-memory ORPO preference fine-tuning (4-bit QLoRA, chunked logits, verified merge)."""

__version__ = "0.1.0"

"""qorpo: low-memory ORPO preference fine-tuning (4-bit QLoRA, chunked logits, verified merge).

    import qorpo
    result = qorpo.train(model=..., data=..., max_steps=200)   # qorpo.api.train
    qorpo.merge(result.output_dir, out="merged")               # qorpo.merge.merge
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TrainConfig", "__version__", "merge", "train"]


def __getattr__(name: str) -> Any:
    # Lazy: `import qorpo` stays cheap (no torch/transformers) until something is used.
    if name == "train":
        from qorpo.api import train

        return train
    if name == "TrainConfig":
        from qorpo.config import TrainConfig

        return TrainConfig
    if name == "merge":
        import importlib

        # the module itself is callable (see the end of qorpo/merge.py), so both
        # `qorpo.merge(...)` and `from qorpo.merge import ...` work
        return importlib.import_module("qorpo.merge")
    raise AttributeError(f"module 'qorpo' has no attribute {name!r}")

"""qorpo: low-memory ORPO preference fine-tuning (4-bit QLoRA, chunked logits, verified merge).

    import qorpo
    result = qorpo.train(model=..., data=..., max_steps=200)   # qorpo.api.train
    qorpo.merge(result.output_dir, out="merged")               # qorpo.merging.merge

See docs/architecture.md for which module owns what.
"""

from __future__ import annotations

from typing import Any

from qorpo._version import __version__

__all__ = ["TrainConfig", "__version__", "evaluate", "merge", "train"]


def __getattr__(name: str) -> Any:
    # Lazy: `import qorpo` stays cheap (no torch/transformers) until something is used.
    if name == "train":
        from qorpo.api import train

        return train
    if name == "merge":
        from qorpo.merging import merge

        return merge
    if name == "evaluate":
        from qorpo.evaluation import evaluate

        return evaluate
    if name == "TrainConfig":
        from qorpo.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'qorpo' has no attribute {name!r}")

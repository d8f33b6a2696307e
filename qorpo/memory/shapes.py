"""The few numbers of a decoder that training memory depends on, from a config (no weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qorpo.errors import ModelError


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a Llama/Mistral-style decoder that memory depends on."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool  # input embedding and output head share one matrix
    checkpoint_bytes: int = 2  # bytes per weight in the checkpoint files (bf16/fp16: 2, fp32: 4)
    # the longest sequence the model takes (None: not stated); not a number memory depends
    # on, so two shapes that differ only here are equal
    context: int | None = field(default=None, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        """Parameters of all decoder linear layers: what bitsandbytes quantises."""
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus (if untied) the output head: never quantised."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, r: int) -> int:
        """LoRA A (r x in) and B (out x r) on every decoder linear layer ('all-linear')."""
        return self.layers * sum(r * (i + o) for i, o in self.linear_shapes())

    def layer_bytes_per_token(self, act_bytes: int = 2) -> float:
        """One decoder layer's working set while it is recomputed and back-propagated, per token.

        Counted from what autograd keeps for a Llama-style layer with LoRA (dropout > 0) on every
        linear layer; `act_bytes` is the compute dtype's size (2 under 16-bit autocast on CUDA,
        4 in fp32 on CPU). An estimate, rounded up where unsure:
        """
        h, kv, i, a = self.hidden, self.kv_dim, self.intermediate, act_bytes
        # two RMSNorms (fp32 weights after prepare_model_for_kbit_training): input, fp32
        # upcast, fp32 output
        norms = 2 * (a + 4 + 4) * h
        # each LoRA layer: a bool dropout mask + the copy of its input that lora_A saves (q, k,
        # v, o, gate, up take width h, down width i)
        lora_inputs = (1 + a) * (6 * h + i)
        # q, k, v; RoPE'd q, k; K/V repeated to all heads (GQA); attention output
        attention = a * ((h + 2 * kv) + (h + kv) + 2 * h + h)
        attention_stats = 4 * self.heads  # SDPA/flash log-sum-exp: O(T), not O(T^2)
        mlp = a * 4 * i  # gate, SiLU(gate), up, their product
        # gradients in flight: two MLP-wide and two hidden-wide fp32 tensors
        grads = 2 * a * i + 2 * 4 * h
        return norms + lora_inputs + attention + attention_stats + mlp + grads


# Shapes from each model's config.json on the hub.
MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("Llama-3.2-1B", 2048, 16, 8192, 128256, 32, 8, tied=True),
        ModelShape("Llama-3.2-3B", 3072, 28, 8192, 128256, 24, 8, tied=True),
        ModelShape("Mistral-7B-v0.1", 4096, 32, 14336, 32000, 32, 8, tied=False),
        ModelShape("Llama-3.1-8B", 4096, 32, 14336, 128256, 32, 8, tied=False),
    )
}


def shape_from_config(config: Any, name: str = "") -> ModelShape:
    """A ModelShape from a transformers config (Llama/Mistral/Qwen-style attribute names)."""
    from qorpo.hf import text_config  # here: qorpo.hf loads torch, qorpo.memory stays torch-free

    cfg = text_config(config)
    heads = int(cfg.num_attention_heads)
    return ModelShape(
        name=name or str(getattr(cfg, "_name_or_path", "") or cfg.model_type),
        hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
        intermediate=int(cfg.intermediate_size), vocab=int(cfg.vocab_size), heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        checkpoint_bytes=_checkpoint_bytes(config),
        context=context_length(cfg),
    )


def context_length(cfg: Any) -> int | None:
    """The longest sequence a (text) config takes: max_position_embeddings, stretched by a
    RoPE scaling that extends it (linear, dynamic, yarn: Qwen2.5's documented yarn factor 4 on
    32,768 gives 131,072); None when the config does not say."""
    from qorpo.hf import text_config  # here: qorpo.hf loads torch, qorpo.memory stays torch-free

    cfg = text_config(cfg)
    base = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(base, int) or base <= 0:
        return None
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if kind in ("linear", "dynamic", "yarn") and isinstance(factor, (int, float)) and factor > 1:
        original = rope.get("original_max_position_embeddings") or base
        return max(base, int(original * factor))
    return base


def _checkpoint_bytes(config: Any) -> int:
    """Bytes per weight as the checkpoint stores them, from config.json's dtype (absent: 2,
    what nearly every hub checkpoint uses)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"
    return {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}.get(name, 2)


def model_shape(model: str, revision: str | None = None,
                trust_remote_code: bool = False) -> ModelShape:
    """The model's shape from its config.json alone: no weight file is opened."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, revision=revision,
                                     trust_remote_code=trust_remote_code)
    return shape_from_config(cfg, name=str(model))


def read_shape(model: str) -> ModelShape:
    """`model_shape`, with a ModelError that says what is wrong with `model` (a missing folder,
    a folder without config.json, a hub id that cannot be read) instead of the hub library's
    words."""
    path = Path(model).expanduser()
    # A path, not a hub id (those are "name" or "org/name"): say the folder is missing rather
    # than pass the hub library's "Repo id must be in the form…" on.
    if not path.exists() and (path.is_absolute() or model.startswith((".", "~"))
                              or model.count("/") > 1 or "\\" in model):
        raise ModelError(f"--model {model}: no such folder (looked from {Path.cwd()}). Pass a "
                         "model folder or a Hugging Face hub id such as "
                         "HuggingFaceTB/SmolLM2-360M-Instruct.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"--model {model} is not a model folder: config.json is missing (a "
                         "model folder holds config.json, as save_pretrained writes it).")
    try:
        return model_shape(model)
    except (OSError, ValueError) as exc:  # not found, offline, not a config
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if path.exists():
            raise ModelError(f"--model {model}: could not read its config.json ({reason}). A "
                             "model folder holds config.json, as save_pretrained writes "
                             "it.") from None
        raise ModelError(f"--model {model}: could not read its config.json from the Hugging "
                         f"Face hub ({reason}). Check the model id and your network (offline, "
                         "HF_HUB_OFFLINE=1 uses models already in the cache), or pass a local "
                         "model folder.") from None

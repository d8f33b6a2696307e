"""The adapter side of the merge: LoRA delta algebra, peft's scaling, and parsing an adapter
folder into :class:`LoraModule` s (refusing what the streaming merge can't do exactly)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qorpo.errors import MergeError
from qorpo.merging.checkpoint import check_pickle, load_tensors, unreadable

PREFIX = "base_model.model."  # of every tensor key in a peft adapter file

# LoRA variants whose merge is not W + s·B@A (or not expressible tensor by tensor).
_UNSUPPORTED_FLAGS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "megatron_config",
)
# Inits that leave the base weights alone (PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA rewrite them).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
_FULL_HINT = "use --method full (loads the model and merges with peft's merge_and_unload())."


# ----------------------------------------------------------------------------- LoRA algebra


def lora_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    embedding: bool = False,
) -> torch.Tensor:
    """``scale · B @ A`` in fp32, laid out like the base weight.

    nn.Linear stores (out, in) = B @ A. GPT-2's Conv1D (``fan_in_fan_out``) stores (in, out) and
    peft's LoRA Embedding keeps A as (r, vocab) and B as (hidden, r): both need the transpose.
    """
    delta = lora_b.float() @ lora_a.float()
    return (delta.T if (fan_in_fan_out or embedding) else delta) * scale


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of an adapter."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None  # lora_B.bias, trained with lora_bias=True
    key: str | None = None  # the checkpoint key it adds to, when known (MoE expert pieces)
    origin: str | None = None  # the adapter module it is a piece of (a peft ParamWrapper)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        out, inp = self.lora_b.shape[0], self.lora_a.shape[1]
        return (inp, out) if (self.embedding or self.fan_in_fan_out) else (out, inp)

    def add_to_(self, weight: torch.Tensor) -> None:
        """``weight += scale · B @ A`` in place (addmm_ avoids a weight-sized temporary)."""
        a, b = self.lora_a.float(), self.lora_b.float()
        if self.embedding or self.fan_in_fan_out:
            weight.addmm_(a.T, b.T, alpha=self.scale)  # (B @ A).T == A.T @ B.T
        else:
            weight.addmm_(b, a, alpha=self.scale)


def peft_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling for ``module``: alpha/r, or alpha/sqrt(r) with rslora, per-module patterns.

    Patterns match like ``peft.utils.other.get_pattern_key``: a key (regex allowed) matching a
    dotted suffix of the module path.
    """

    def lookup(patterns: dict[str, Any] | None, default: Any) -> Any:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    expected = int(lookup(config.get("rank_pattern"), config.get("r", 8)))
    if expected != rank:
        raise MergeError(
            f"adapter module {module!r} has rank {rank} but adapter_config.json implies "
            f"r={expected} (r / rank_pattern): the adapter files are inconsistent."
        )
    alpha = float(lookup(config.get("alpha_pattern"), config.get("lora_alpha", 8)))
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


# ----------------------------------------------------------------------------- the adapter


@dataclass
class Adapter:
    """A parsed LoRA adapter: LoRA modules plus whole tensors it replaces in the base."""

    path: Path
    config: dict[str, Any]
    loras: dict[str, LoraModule]
    replacements: dict[str, torch.Tensor]  # "module.param" -> tensor (modules_to_save, ...)
    # replacements saved as "x.base_layer.weight": peft loads them into the base layer itself,
    # i.e. into the parameter a tied pair shares (modules_to_save copies are the module's own)
    shared: set[str] = field(default_factory=set)
    # LoRA pairs of peft ParamWrappers (target_parameters: MoE experts), by key prefix; the
    # merge turns them into modules with the base model at hand (qorpo.merging.experts)
    params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def modules(self) -> int:
        """Adapter modules (a ParamWrapper split into per-expert pieces counts once)."""
        return len({lora.origin or name for name, lora in self.loras.items()})


def locate_adapter(path: Path) -> Path:
    """The adapter folder: `path` itself, or (for `runs/x/adapter`, as older docs wrote it) the
    training output folder above it, where qorpo writes the adapter."""
    if (path / "adapter_config.json").is_file():
        return path
    if path.name == "adapter" and (path.parent / "adapter_config.json").is_file():
        return path.parent
    if not path.exists():
        raise MergeError(f"adapter folder {path} does not exist. Pass the training output "
                         "folder (it holds adapter_config.json and adapter_model.safetensors).")
    raise MergeError(f"{path} holds no adapter_config.json: pass the training output folder or "
                     "a checkpoint-N folder inside it.")


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise MergeError(f"{cfg_file} not found: is {adapter_dir} a peft/qorpo adapter folder?")
    return read_json(cfg_file)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; a damaged or cut-short one is a MergeError naming it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot read {path}: {exc}; copy or save it again") from None
    if not isinstance(value, dict):
        raise MergeError(f"{path} holds no JSON object; copy or save it again")
    return value


def check_streamable(config: dict[str, Any]) -> None:
    """Refuse adapter features whose merge is not a plain ``W + s·B@A``."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeError(
            f"the streaming merge handles LoRA adapters, not {peft_type}; {_FULL_HINT}"
        )
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise MergeError(
                f"adapter sets {flag}={config[flag]!r}; streaming can't merge it; {_FULL_HINT}"
            )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise MergeError(
            f"adapter was initialised with init_lora_weights={init!r}, which rewrites the base "
            "weights; convert it to a plain LoRA first (peft save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), then merge."
        )


_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "eA",
    ".lora_embedding_B": "eB",
}


def read_adapter(
    adapter_dir: Path, *, allow_pickle: bool = False, params: Collection[str] = ()
) -> Adapter:
    """Parse an adapter folder for the streaming merge, refusing what it cannot merge exactly.
    ``params``: key prefixes of peft ParamWrappers, kept apart as raw pairs in ``.params``."""
    config = read_adapter_config(adapter_dir)
    check_streamable(config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    shared: set[str] = set()
    for raw, value in load_tensors(adapter_dir, "adapter_model", allow_pickle).items():
        if not raw.startswith(PREFIX):
            raise MergeError(f"unexpected key {raw!r} in {adapter_dir} (no {PREFIX!r} prefix)")
        key = raw[len(PREFIX) :]
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = value
        elif ".lora_" in key:
            raise MergeError(f"adapter tensor {key!r} is not a plain LoRA weight; {_FULL_HINT}")
        else:
            # "x.base_layer.weight" (peft saves targeted embedding layers) and "x.weight"
            # (modules_to_save; older files: "x.modules_to_save.weight") replace base "x.weight".
            if ".base_layer." in key:
                key = key.replace(".base_layer.", ".")
                shared.add(key)
            replacements[key.replace(".modules_to_save.", ".")] = value
    # ParamWrapper keys carry no parameter name ("experts.lora_A.weight", nested wrappers
    # "experts.base_layer.lora_A.weight"): which is which, peft says (qorpo.merging.experts)
    taken = {n: parts.pop(n) for n in params if n in parts}
    loras = {name: _lora_module(config, name, p) for name, p in parts.items()}
    return Adapter(adapter_dir, config, loras, replacements, shared, taken)


def _lora_module(config: dict[str, Any], name: str, p: dict[str, torch.Tensor]) -> LoraModule:
    embedding = "eA" in p or "eB" in p
    a, b = (p.get("eA"), p.get("eB")) if embedding else (p.get("A"), p.get("B"))
    if a is None or b is None:
        raise MergeError(f"adapter module {name!r} has only one of lora_A / lora_B")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise MergeError(
            f"adapter module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are "
            f"not a 2-D LoRA pair (conv layer?); {_FULL_HINT}"
        )
    return LoraModule(
        name=name,
        lora_a=a,
        lora_b=b,
        scale=peft_scale(config, name, a.shape[0]),
        embedding=embedding,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not embedding,
        bias=p.get("bias"),
    )


def adapter_keys(adapter_dir: Path, allow_pickle: bool) -> list[str]:
    st_file, bin_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st_file.is_file():
        from safetensors import safe_open

        with unreadable(st_file), safe_open(str(st_file), framework="pt") as fh:
            return [k.removeprefix(PREFIX) for k in fh.keys()]
    if bin_file.is_file():
        check_pickle(bin_file, allow_pickle)
        with unreadable(bin_file):
            state = torch.load(str(bin_file), map_location="cpu", weights_only=True, mmap=True)
        return [k.removeprefix(PREFIX) for k in state]
    raise MergeError(f"no adapter_model.safetensors (or .bin) in {adapter_dir}")

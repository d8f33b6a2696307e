"""Mixture-of-experts parameters (peft ``target_parameters``) for the streaming merge.

transformers 5 holds a MoE layer's experts as 3-D parameters (Qwen3-MoE:
``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I)), and peft's default
``all-linear`` on such a model trains them through ``lora.ParamWrapper`` (with the router's
``gate.weight``). Checkpoints keep one 2-D tensor per expert and projection
(``experts.3.gate_proj.weight``; Mixtral: ``block_sparse_moe.experts.3.w1.weight``), which
transformers' conversion mapping stacks and concatenates at load time.

Rather than restate either library, this module asks peft (on a weightless meta-device model)
which wrapper holds which parameter with which scaling and layout, and transformers' conversion
mapping which checkpoint tensors make up that parameter. Each wrapper then becomes ordinary 2-D
LoRA pieces, one per checkpoint tensor: rows [a, b) of expert e's ``W_e + s·B_e A_e`` are
``W_piece + s·B_e[a:b] A_e``, so the merge stays tensor by tensor.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qorpo.errors import MergeError
from qorpo.merging.adapter import LoraModule

_FULL_HINT = "use --method full (loads the model and merges with peft's merge_and_unload())."


@dataclass(frozen=True)
class ExpertsLora(LoraModule):
    """A LoRA on a checkpoint tensor that holds all experts stacked, (E, d1, d2)."""

    experts: tuple[LoraModule, ...] = field(default=())

    @property
    def weight_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (len(self.experts), *self.experts[0].weight_shape)

    def add_to_(self, weight: torch.Tensor) -> None:
        for e, piece in enumerate(self.experts):
            piece.add_to_(weight[e])


class Wrapper(NamedTuple):
    """One peft ParamWrapper, as peft builds it for this adapter and model."""

    prefix: str  # key prefix of its lora_A / lora_B in the adapter file ("...experts.base_layer")
    param: str  # the model parameter it adapts ("model.layers.0.mlp.experts.gate_up_proj")
    shape: tuple[int, ...]  # that parameter's shape
    experts: int  # 1 for a 2-D parameter
    swapped: bool  # (E, out, in) storage, peft's "_did_swap_in_out_features"
    rank: int
    scale: float


# checkpoint key -> (model key, the WeightConverter that takes it or None, its source pattern)
Convert = Callable[[str], tuple[str, Any, str | None]]


def wrappers(
    base_dir: Path, adapter_dir: Path, *, trust_remote_code: bool
) -> tuple[list[Wrapper], Convert]:
    """peft's ParamWrappers for this adapter on a meta-device model, and the model's weight
    conversions (checkpoint key -> (model key, converter or None))."""
    from peft import PeftConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unknown/custom architecture
        raise MergeError(
            f"cannot instantiate the base architecture ({exc}), which places the adapter's "
            f"target_parameters; {_FULL_HINT}"
        ) from None
    meta_state = model.state_dict()
    convert = _key_converter(model, meta_state)
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    try:
        with pattern_noise_hidden():
            inject_adapter_in_model(peft_config, model, low_cpu_mem_usage=True)
    except (ValueError, TypeError) as exc:
        raise MergeError(
            f"peft cannot apply the adapter in {adapter_dir} to {base_dir}: {exc}; was it "
            "trained on a different base model? (pass --base)"
        ) from None
    found: list[Wrapper] = []
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper) and "default" in module.lora_A:
            param = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
            found.append(Wrapper(
                prefix=name, param=param, shape=tuple(module.get_param().shape),
                experts=module.num_experts, swapped=module._did_swap_in_out_features,
                rank=module.r["default"], scale=float(module.scaling["default"]),
            ))  # fmt: skip
    return found, convert


@contextmanager
def pattern_noise_hidden() -> Iterator[None]:
    """peft warns that a fused expert stack's rank/alpha pattern (".*\\.gate_up_proj", which its
    own MoE conversion wrote) "did not match any targeted module", and then applies it to the
    ParamWrapper all the same: nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match",
                                RuntimeWarning)
        yield


def _key_converter(model: Any, meta_state: dict[str, Any]) -> Convert:
    """checkpoint key -> (model key, the WeightConverter that takes it, or None), as
    transformers' loader renames keys (qorpo's checkpoints are read in the saved layout)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def convert(key: str) -> tuple[str, Any, str | None]:
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix,
                                         meta_state)
        owner = next((c for c in converters if pattern in c.source_patterns), None)
        return new, owner, pattern

    return convert


def expert_loras(
    found: list[Wrapper],
    convert: Convert,
    parts: dict[str, dict[str, torch.Tensor]],
    ckpt_meta: dict[str, tuple[str, tuple[int, ...]]],
) -> dict[str, LoraModule]:
    """The 2-D (or stacked) LoRA pieces of every ParamWrapper, keyed by checkpoint key."""
    by_param: dict[str, list[tuple[str, Any, str | None]]] = {}
    for key in ckpt_meta:
        new, converter, pattern = convert(key)
        by_param.setdefault(new, []).append((key, converter, pattern))
    out: dict[str, LoraModule] = {}
    for w in found:
        p = parts.pop(w.prefix, {})
        a, b = p.get("A"), p.get("B")
        out_f, in_f = w.shape[-2:] if w.experts == 1 or w.swapped else w.shape[:-3:-1]
        want_a, want_b = (w.rank * w.experts, in_f), (out_f, w.rank * w.experts)
        if a is None or b is None or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            got = "missing" if a is None or b is None else f"{tuple(a.shape)}, {tuple(b.shape)}"
            raise MergeError(
                f"adapter module {w.prefix!r} (peft target parameter {w.param} {w.shape}): "
                f"LoRA A, B should be {want_a}, {want_b}, got {got}; the adapter was trained "
                "on a different base model (pass --base)"
            )
        sources = by_param.get(w.param)
        if not sources:
            raise MergeError(f"adapter parameter {w.param!r} matches no tensor of the base "
                             f"checkpoint; {_FULL_HINT}")
        index = {(p, _expert_index(p, k)): k for k, c, p in sources if c is not None}
        for key, converter, pattern in sources:
            out[key] = _piece(w, a, b, key, converter, pattern, index, ckpt_meta)
    return out


def _factors(w: Wrapper, a: torch.Tensor, b: torch.Tensor, e: int) -> tuple[torch.Tensor, ...]:
    """Expert ``e``'s (A_e (r, in), B_e (out, r)): peft lays A out expert-major (E·r rows) and
    B's columns rank-major (r·E), see ParamWrapper.get_delta_weight."""
    if w.experts == 1:
        return a, b
    a_e = a.reshape(w.experts, w.rank, a.shape[-1])[e]
    b_e = b.reshape(b.shape[0], w.rank, w.experts)[:, :, e]
    return a_e, b_e


def _lora(w: Wrapper, name: str, key: str, a: torch.Tensor, b: torch.Tensor,
          rows: slice | None = None) -> LoraModule:
    """LoRA on rows ``rows`` of one expert matrix laid out like the parameter: (out, in) when
    peft swapped in/out (delta B@A), else (in, out) (delta (B@A).T, i.e. fan_in_fan_out)."""
    ffo = w.experts > 1 and not w.swapped
    if rows is not None:
        a, b = (a[:, rows], b) if ffo else (a, b[rows])
    return LoraModule(name=name, lora_a=a, lora_b=b, scale=w.scale, fan_in_fan_out=ffo,
                      key=key, origin=w.prefix)


def _piece(
    w: Wrapper,
    a: torch.Tensor,
    b: torch.Tensor,
    key: str,
    converter: Any,
    pattern: str | None,
    index: dict[tuple[str | None, int], str],
    ckpt_meta: dict[str, tuple[str, tuple[int, ...]]],
) -> LoraModule:
    name = key.removesuffix(".weight")
    shape = ckpt_meta[key][1]
    if converter is None:  # the checkpoint holds the parameter as it is (maybe renamed)
        if shape != w.shape:
            raise MergeError(f"base tensor {key!r} {shape} is not the model's {w.param} "
                             f"{w.shape}; {_FULL_HINT}")
        if w.experts == 1:
            return _lora(w, name, key, a, b)
        pieces = tuple(_lora(w, name, key, *_factors(w, a, b, e)) for e in range(w.experts))
        return ExpertsLora(name=name, lora_a=a, lora_b=b, scale=w.scale, key=key,
                           origin=w.prefix, experts=pieces)
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        raise MergeError(f"base tensor {key!r} becomes {w.param} through {ops}, which the "
                         f"streaming merge does not split; {_FULL_HINT}")
    expert = _expert_index(pattern, key)
    # this tensor's rows inside expert `expert`'s slice: after the sources listed before it
    offset = 0
    for source in converter.source_patterns[: converter.source_patterns.index(pattern)]:
        sibling = index.get((source, expert))
        if sibling is None:
            raise MergeError(f"base tensor {key!r}: no {source!r} of expert {expert} beside it")
        offset += ckpt_meta[sibling][1][0]
    if w.experts <= expert or len(shape) != 2:
        raise MergeError(f"base tensor {key!r} {shape} does not fit {w.param} {w.shape}")
    rows = slice(offset, offset + shape[0])
    return _lora(w, name, key, *_factors(w, a, b, expert), rows=rows)


def _expert_index(pattern: str | None, key: str) -> int:
    """The ``*`` of a converter's source pattern (``mlp.experts.*.gate_proj.weight``) in ``key``:
    the position MergeModulelist stacks that tensor at."""
    regex = re.escape(str(pattern)).replace(r"\*", r"(\d+)")
    m = re.search(regex, key)
    if m is None or m.lastindex != 1:
        raise MergeError(f"cannot tell which expert base tensor {key!r} holds; {_FULL_HINT}")
    return int(m.group(1))

"""The two merge methods, one result type: ``stream`` (tensor by tensor into planned shards) and
``full`` (load the model, peft ``merge_and_unload()``)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qorpo.errors import MergeError
from qorpo.hf import text_config
from qorpo.merging.adapter import (
    PREFIX,
    Adapter,
    adapter_keys,
    read_adapter,
    read_adapter_config,
)
from qorpo.merging.checkpoint import ST_NAMES, BaseCheckpoint, load_tensors, nbytes
from qorpo.merging.options import parse_size
from qorpo.merging.plan import ModelInfo, Plan, build_plan, materialize
from qorpo.merging.shards import ShardWriter, plan_shards
from qorpo.quant import nf4_round_trip

_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<key>\S+?): copying a param with shape "
    r"torch\.Size\((?P<saved>\[[^]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((?P<model>\[[^]]*\])\)"
)


class Merged(NamedTuple):
    """What a merge method wrote into the staging folder."""

    files: list[str]  # weight files
    untied: list[str]  # tied weights written separately because the adapter changes one
    merged_modules: int  # LoRA modules folded into base weights
    replaced_tensors: int  # tensors copied whole from the adapter (modules_to_save, ...)


def stream_merge(
    plan: Plan,
    base: BaseCheckpoint,
    tmp: Path,
    max_bytes: int,
    compute_dtype: torch.dtype,
    progress: bool,
) -> Merged:
    """Base tensor by tensor (one input file at a time) into the planned shards."""
    writer = ShardWriter(tmp, plan_shards(plan.items, max_bytes))
    groups = [(f, list(g)) for f, g in groupby(plan.items, key=lambda it: base.where[it.source])]
    with _progress(progress, len(groups), "merging shards") as advance:
        try:
            for file, group in groups:
                with base.reader(file) as get:
                    for item in group:
                        writer.write(item.key, materialize(item, get, compute_dtype))
                        if item.touched:
                            _release_freed_memory()
                advance()
            writer.close()
        finally:
            writer.abort()
    return Merged(writer.names, plan.untied, plan.merged_modules, plan.replaced)


def prepare(
    adapter: Path,
    ckpt: BaseCheckpoint,
    info: ModelInfo,
    out_dtype: torch.dtype,
    *,
    into: str,
    method: str,
    max_shard_size: str | int,
    allow_pickle: bool,
    compute_dtype: torch.dtype,
    progress: bool,
    trust_remote_code: bool,
) -> tuple[Callable[[Path], Merged], int]:
    """The merge method, ready to write into a folder, and the bytes of weights it will write.
    The streaming plan is built, and fails, before the disk is touched."""
    dequantize = into == "dequantized"
    if method == "stream":
        parsed = _read_with_experts(adapter, ckpt, allow_pickle, trust_remote_code)
        plan = build_plan(
            parsed, ckpt, info, out_dtype, dequantize=dequantize, compute_dtype=compute_dtype
        )
        write = partial(
            stream_merge,
            plan,
            ckpt,
            max_bytes=parse_size(max_shard_size),
            compute_dtype=compute_dtype,
            progress=progress,
        )
        return write, plan.nbytes
    adapter_keys(adapter, allow_pickle)  # same pickle policy as the streaming path
    need = sum(nbytes(ST_NAMES[out_dtype], s) for _, s in ckpt.meta.values())
    write = partial(
        full_merge,
        adapter,
        ckpt,
        info,
        out_dtype=out_dtype,
        dequantize=dequantize,
        max_shard_size=max_shard_size,
        compute_dtype=compute_dtype,
        trust_remote_code=trust_remote_code,
    )
    return write, need


def _read_with_experts(
    adapter: Path, ckpt: BaseCheckpoint, allow_pickle: bool, trust_remote_code: bool
) -> Adapter:
    """The parsed adapter; a MoE adapter's expert parameters (peft ``target_parameters``)
    become per-checkpoint-tensor LoRA modules (qorpo.merging.experts)."""
    if not read_adapter_config(adapter).get("target_parameters"):
        return read_adapter(adapter, allow_pickle=allow_pickle)
    from qorpo.merging.experts import expert_loras, wrappers

    found, convert = wrappers(ckpt.path, adapter, trust_remote_code=trust_remote_code)
    parsed = read_adapter(adapter, allow_pickle=allow_pickle, params=[w.prefix for w in found])
    parsed.loras |= expert_loras(found, convert, parsed.params, ckpt.meta)
    return parsed


def _release_freed_memory() -> None:
    """Give freed heap back to the OS (glibc only; a no-op elsewhere).

    After the first large free, glibc raises its mmap threshold, so later weight-sized fp32
    temporaries land on the heap and fragment it: without a trim, RSS creeps up tensor by tensor.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*cols, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


# ----------------------------------------------------------------------------- full (peft) merge


def full_merge(
    adapter_dir: Path,
    base: BaseCheckpoint,
    info: ModelInfo,
    tmp: Path,
    out_dtype: torch.dtype,
    *,
    dequantize: bool,
    max_shard_size: str | int,
    compute_dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> Merged:
    """Load in fp32, let peft merge_and_unload(), cast and save. Handles any peft adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qorpo.merging.experts import pattern_noise_hidden

    model = AutoModelForCausalLM.from_pretrained(
        str(base.path),
        dtype=torch.float32,
        use_safetensors=not base.pickle,
        trust_remote_code=trust_remote_code,
    )
    if dequantize:
        with torch.no_grad():
            for key, is_conv in info.quantized.items():
                param = model.get_parameter(key)
                param.copy_(nf4_round_trip(param, transpose=is_conv, dtype=compute_dtype))
    untied = _untie_for_peft(model, adapter_dir, info)
    try:
        with pattern_noise_hidden():
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except RuntimeError as exc:  # peft's "size mismatch for …" (dozens of lines): say it once
        m = _SIZE_MISMATCH.search(str(exc))
        if m is None:
            raise
        raise MergeError(
            f"adapter tensor {m['key']!r} {m['saved']} does not fit the base model's "
            f"{m['model']}; the adapter was trained on a different base model (pass --base)."
        ) from None
    n_modules = sum(
        1 for m in peft_model.modules() if hasattr(m, "merge") and hasattr(m, "base_layer")
    )
    merged = peft_model.merge_and_unload()
    merged.to(out_dtype)
    try:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    except Exception as exc:  # safetensors' writer reports a full disk as "... (os error 28)"
        code = _OS_ERROR.search(str(exc))
        if isinstance(exc, OSError) or code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from exc
    files = sorted(p.name for p in tmp.glob("*.safetensors"))
    return Merged(files, untied, n_modules, 0)


def _untie_for_peft(model: Any, adapter_dir: Path, info: ModelInfo) -> list[str]:
    """Give tied weights their own storage when the adapter touches one of them.

    peft's merge_and_unload() adds the delta into the shared matrix, which also changes the
    other end (for ensure_weight_tying adapters, it even adds it twice).
    """
    if not info.tied:
        return []
    state = load_tensors(adapter_dir, "adapter_model", allow_pickle=True)  # policy checked
    keys = [k.removeprefix(PREFIX) for k in state]
    untied = []
    for target, source in info.tied.items():
        mods = [m.removesuffix(".weight") for m in (target, source)]
        if any(k.startswith(m + ".") for k in keys for m in mods):
            module_name, param = target.rsplit(".", 1)
            shared = model.get_parameter(source)
            with torch.no_grad():  # what peft would load into the shared parameter
                for m in mods:
                    saved = state.get(f"{PREFIX}{m}.base_layer.weight")
                    shared.copy_(saved) if saved is not None else None
            setattr(
                model.get_submodule(module_name), param, torch.nn.Parameter(shared.detach().clone())
            )
            untied.append(target)
    if untied:
        _set_tie_flag(model.config, False)
    return untied


def _set_tie_flag(config: Any, value: bool) -> None:
    config.tie_word_embeddings = value
    text = text_config(config)
    if text is not config:
        text.tie_word_embeddings = value

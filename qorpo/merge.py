"""Merge a LoRA adapter into its base model for deployment.

The default *streaming* merge never builds the model: it walks the base checkpoint shard by
shard, tensor by tensor, folds each LoRA delta in (in fp32) and streams the result straight into
output safetensors files whose layout is planned up front, so peak memory stays around one input
shard plus the adapter whatever the model size. ``method="full"`` loads the model and uses peft's
``merge_and_unload()`` instead (for adapter features the streaming path does not handle).

Everything is written into a temporary sibling of the output folder and renamed into place at
the end: a crash, Ctrl-C or a full disk never leaves a half-written model behind.

This module is the public entry and runs the steps; the parts live in
``merge_common`` (errors, dtype tables), ``merge_lora`` (adapter, LoRA algebra, NF4),
``merge_io`` (checkpoint reading, shard writing, base resolution, staging), ``merge_plan``
(tensor-by-tensor plan), ``merge_methods`` (stream / full) and ``merge_output`` (config,
tokenizer, model card). Their public names are re-exported here.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from qorpo.merge_common import DTYPES, ST_NAMES, MergeError, MergeVerificationError, nbytes, numel
from qorpo.merge_io import (
    BaseCheckpoint,
    ShardWriter,  # noqa: F401 - re-exported, like the other public names of the merge_* modules
    check_disk,
    check_out_dir,
    open_base,
    parse_size,
    plan_shards,  # noqa: F401
    resolve_base,
    shard_names,  # noqa: F401
    staging,
)
from qorpo.merge_lora import (
    Adapter,  # noqa: F401
    LoraModule,
    adapter_keys,
    check_streamable,  # noqa: F401
    lora_delta,
    nf4_round_trip,
    peft_scale,
    read_adapter,
    read_adapter_config,
)
from qorpo.merge_methods import full_merge, stream_merge
from qorpo.merge_output import end_of_turn_ids, write_model_files  # noqa: F401 - end_of_turn_ids
from qorpo.merge_plan import (
    Item,  # noqa: F401
    ModelInfo,
    Plan,
    build_plan,
    materialize,  # noqa: F401
    model_info,
)

if TYPE_CHECKING:
    from qorpo.merge_verify import VerifyReport

_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class MergeResult(NamedTuple):
    """What :func:`merge` wrote, and how well it matches base + adapter."""

    out_dir: Path
    base: Path  # the resolved base model folder
    adapter_dir: Path
    method: str  # "stream" | "full"
    into: str  # "original" | "dequantized"
    dtype: str  # "bf16" | "fp16" | "fp32"
    weight_files: tuple[str, ...]
    total_bytes: int
    merged_modules: int  # LoRA modules folded into base weights
    replaced_tensors: int  # tensors copied from the adapter (modules_to_save, saved layers)
    untied: tuple[str, ...]  # tied weights written separately because the adapter changes one
    tokenizer_source: Path
    verification: VerifyReport | None
    notes: tuple[str, ...]
    seconds: float


def resolve_dtype(dtype: str, base_config: dict[str, Any]) -> tuple[str, str | None]:
    """``auto`` -> the base's config dtype (dtype / torch_dtype), fp32 when it names none."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise MergeError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
        return dtype, None
    for cfg in (base_config, base_config.get("text_config") or {}):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and name.removeprefix("torch.") in _CONFIG_DTYPES:
            return _CONFIG_DTYPES[name.removeprefix("torch.")], None
    return "fp32", "base config names no dtype; writing fp32"


def merge(
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    into: str = "original",
    method: str = "stream",
    max_shard_size: str | int = "5GB",
    verify: bool | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> MergeResult:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and save it to ``out``.

    ``base`` defaults to the adapter's ``base_model_name_or_path``. ``into="dequantized"`` first
    passes every 4-bit-quantised weight through the NF4 round trip training saw (in
    ``compute_dtype``). ``verify=None`` verifies when the model comfortably fits in RAM.
    Raises :class:`MergeError` (nothing written) or :class:`MergeVerificationError`.
    """
    start = time.perf_counter()
    if into not in ("original", "dequantized") or method not in ("stream", "full"):
        raise MergeError(
            f"into must be original|dequantized and method stream|full, got {into!r}, {method!r}"
        )
    adapter = Path(adapter_dir).expanduser().resolve()
    base_ref, base_dir, base_config = _locate_base(adapter, base, allow_pickle)
    out_dir = Path(out).expanduser().absolute()
    check_out_dir(out_dir, force, [adapter, base_dir])
    ckpt = open_base(base_dir, allow_pickle=allow_pickle)
    dtype_name, dtype_note = resolve_dtype(dtype, base_config)
    out_dtype = DTYPES[dtype_name]
    info, info_note = _model_info_or_none(base_dir, needed=into == "dequantized")
    dequantize = into == "dequantized"
    plan, need = _plan(
        adapter, ckpt, info, out_dtype, method, dequantize, compute_dtype, allow_pickle
    )
    check_disk(out_dir.parent, need)
    notes = [n for n in (dtype_note, info_note) if n]
    with staging(out_dir) as tmp:
        if plan is not None:
            files = stream_merge(
                plan, ckpt, tmp, parse_size(max_shard_size), compute_dtype, progress
            )
            untied, n_merged, n_replaced = plan.untied, plan.merged_modules, plan.replaced
        else:
            files, untied, n_merged = full_merge(
                adapter,
                ckpt,
                info,
                tmp,
                out_dtype,
                dequantize=dequantize,
                max_shard_size=max_shard_size,
                compute_dtype=compute_dtype,
            )
            n_replaced = 0
        notes += [f"untied {k} from {info.tied[k]}: the adapter changes it" for k in untied]
        settings = {"method": method, "into": into, "dtype": dtype_name, "adapter": str(adapter)}
        settings |= {"max_shard_size": max_shard_size, "untied": ", ".join(untied) or "-"}
        tok_src = write_model_files(tmp, out_dir.name, adapter, base_dir, base_ref, settings, notes)
        report = _maybe_verify(tmp, adapter, ckpt, into, dtype_name, verify, notes)
    return MergeResult(
        out_dir=out_dir,
        base=base_dir,
        adapter_dir=adapter,
        method=method,
        into=into,
        dtype=dtype_name,
        weight_files=tuple(files),
        total_bytes=sum((out_dir / f).stat().st_size for f in files),
        merged_modules=n_merged,
        replaced_tensors=n_replaced,
        untied=tuple(untied),
        tokenizer_source=tok_src,
        verification=report,
        notes=tuple(notes),
        seconds=time.perf_counter() - start,
    )


def _locate_base(
    adapter: Path, base: str | os.PathLike[str] | None, allow_pickle: bool
) -> tuple[str, Path, dict[str, Any]]:
    """The base model (reference, folder, config): ``base`` or the adapter's, not pre-quantized."""
    adapter_cfg = read_adapter_config(adapter)
    base_ref = str(base) if base is not None else adapter_cfg.get("base_model_name_or_path")
    if not base_ref:
        raise MergeError(
            f"{adapter}/adapter_config.json names no base_model_name_or_path; pass --base"
        )
    base_dir = resolve_base(
        base_ref, revision=adapter_cfg.get("revision"), allow_pickle=allow_pickle
    )
    base_config = json.loads((base_dir / "config.json").read_text())
    if base_config.get("quantization_config"):
        raise MergeError(
            f"base {base_dir} is a pre-quantized checkpoint "
            f"({base_config['quantization_config'].get('quant_method')}); "
            "merge into the original 16/32-bit model instead: pass --base <original model>"
        )
    return base_ref, base_dir, base_config


def _model_info_or_none(base_dir: Path, *, needed: bool) -> tuple[ModelInfo, str | None]:
    try:
        return model_info(base_dir), None
    except Exception as exc:  # noqa: BLE001 - unknown/custom architecture
        if needed:
            raise MergeError(
                f"cannot instantiate the base architecture ({exc}), so the 4-bit quantised set is "
                "unknown; --into dequantized needs it (use --into original)"
            ) from exc
        return ModelInfo(), f"architecture not instantiable ({exc}); tied weights not checked"


def _plan(
    adapter: Path,
    ckpt: BaseCheckpoint,
    info: ModelInfo,
    out_dtype: torch.dtype,
    method: str,
    dequantize: bool,
    compute_dtype: torch.dtype,
    allow_pickle: bool,
) -> tuple[Plan | None, int]:
    """The streaming plan (built, and failing, before the disk is touched); bytes to write."""
    if method == "stream":
        parsed = read_adapter(adapter, allow_pickle=allow_pickle)
        plan = build_plan(
            parsed,
            ckpt,
            info,
            out_dtype,
            dequantize=dequantize,
            compute_dtype=compute_dtype,
        )
        return plan, sum(nbytes(it.dtype, it.shape) for it in plan.items)
    adapter_keys(adapter, allow_pickle)  # same pickle policy as the streaming path
    return None, sum(nbytes(ST_NAMES[out_dtype], s) for _, s in ckpt.meta.values())


def _maybe_verify(
    tmp: Path,
    adapter: Path,
    ckpt: BaseCheckpoint,
    into: str,
    dtype: str,
    verify: bool | None,
    notes: list[str],
) -> VerifyReport | None:
    from qorpo.merge_verify import verification_budget, verify_merged

    if verify is False:
        return None
    n_params = sum(numel(shape) for _, shape in ckpt.meta.values())
    ok, why = verification_budget(n_params)
    if verify is None and not ok:
        notes.append(f"verification skipped: {why}; pass --verify to force it")
        return None
    report = verify_merged(
        tmp,
        adapter,
        ckpt.path,
        into=into,
        dtype=dtype,
        use_safetensors=not ckpt.pickle,
        other=None if ok else False,
    )
    if not report.passed:
        raise MergeVerificationError(
            f"merged model disagrees with base + adapter: {report.summary()}", report
        )
    return report


__all__ = [
    "DTYPES",
    "LoraModule",
    "MergeError",
    "MergeResult",
    "MergeVerificationError",
    "lora_delta",
    "merge",
    "nf4_round_trip",
    "peft_scale",
    "resolve_base",
]


class _CallableModule(types.ModuleType):
    """``qorpo.merge(...)`` calls :func:`merge`.

    Importing ``qorpo.merge`` binds the *module* as the package attribute ``qorpo.merge``, so a
    plain function export would be shadowed; a callable module works both ways.
    """

    def __call__(
        self, adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], **kwargs: Any
    ) -> MergeResult:
        return merge(adapter_dir, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

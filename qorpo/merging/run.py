"""``qorpo merge``: fold a LoRA adapter into its base model for deployment.

The default *streaming* merge never builds the model: it walks the base checkpoint shard by
shard, tensor by tensor, folds each LoRA delta in (in fp32) and streams the result straight into
output safetensors files whose layout is planned up front, so peak memory stays around one input
tensor plus the adapter whatever the model size. ``method="full"`` loads the model and uses
peft's ``merge_and_unload()`` instead (for adapter features the streaming path does not handle).

Everything is written into a temporary sibling of the output folder and renamed into place at
the end: a crash, Ctrl-C or a full disk never leaves a half-written model behind. ``gguf=`` also
exports ``<out>/<name>-<type>.gguf`` (qorpo.export) into that folder before the rename, so a
GGUF that fails its verification leaves nothing either.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from qorpo.errors import MergeError, MergeVerificationError
from qorpo.hf import DTYPES, short_dtype_name
from qorpo.merging.adapter import (
    adapter_keys,
    locate_adapter,
    read_adapter,
    read_adapter_config,
)
from qorpo.merging.checkpoint import (
    ST_NAMES,
    BaseCheckpoint,
    nbytes,
    numel,
    open_base,
    resolve_base,
)
from qorpo.merging.methods import Merged, full_merge, stream_merge
from qorpo.merging.output import tokenizer_source, write_model_files
from qorpo.merging.plan import ModelInfo, build_plan, model_info
from qorpo.merging.shards import check_disk, check_out_dir, parse_size, staging

if TYPE_CHECKING:
    from qorpo.export.run import GGUFResult
    from qorpo.merging.verify import VerifyReport


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
    gguf: GGUFResult | None = None  # with gguf=: the .gguf + Modelfile, and their verification


def resolve_dtype(dtype: str, base_config: dict[str, Any]) -> tuple[str, str | None]:
    """``auto`` -> the base's config dtype (dtype / torch_dtype), fp32 when it names none."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise MergeError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
        return dtype, None
    for cfg in (base_config, base_config.get("text_config") or {}):
        name = short_dtype_name(cfg.get("dtype") or cfg.get("torch_dtype"))
        if name is not None:
            return name, None
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
    gguf: str | None = None,
) -> MergeResult:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and save it to ``out``.

    ``base`` defaults to the adapter's ``base_model_name_or_path``. ``into="dequantized"`` first
    passes every 4-bit-quantised weight through the NF4 round trip training saw (in
    ``compute_dtype``). ``verify=None`` verifies when the model comfortably fits in RAM.
    ``gguf`` ("f16" | "bf16" | "q8_0"): also write ``out/<out name>-<gguf>.gguf`` and an Ollama
    Modelfile, checked against the merged model under the same ``verify`` switch.
    Raises :class:`MergeError` (nothing written) or :class:`MergeVerificationError`.
    """
    start = time.perf_counter()
    if into not in ("original", "dequantized") or method not in ("stream", "full"):
        raise MergeError(
            f"into must be original|dequantized and method stream|full, got {into!r}, {method!r}"
        )
    adapter = locate_adapter(Path(adapter_dir).expanduser().resolve())
    base_ref, base_dir, base_config = _locate_base(adapter, base, allow_pickle)
    out_dir = Path(out).expanduser().absolute()
    check_out_dir(out_dir, force, [adapter, base_dir])
    if gguf is not None:  # what the export would refuse, refused before the merge
        from qorpo.export.run import preflight

        preflight(base_config, tokenizer_source(adapter, base_dir), gguf)
    ckpt = open_base(base_dir, allow_pickle=allow_pickle)
    n_params = sum(numel(shape) for _, shape in ckpt.meta.values())
    dtype_name, dtype_note = resolve_dtype(dtype, base_config)
    out_dtype = DTYPES[dtype_name]
    info, info_note = _model_info_or_none(base_dir, needed=into == "dequantized")
    dequantize = into == "dequantized"
    write: Callable[[Path], Merged]
    if method == "stream":  # the plan is built, and fails, before the disk is touched
        parsed = read_adapter(adapter, allow_pickle=allow_pickle)
        plan = build_plan(
            parsed, ckpt, info, out_dtype, dequantize=dequantize, compute_dtype=compute_dtype
        )
        need = plan.nbytes
        write = partial(
            stream_merge,
            plan,
            ckpt,
            max_bytes=parse_size(max_shard_size),
            compute_dtype=compute_dtype,
            progress=progress,
        )
    else:
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
        )
    if gguf is not None:
        from qorpo.export.gguf import file_bytes

        need += file_bytes(n_params, gguf)
    check_disk(out_dir.parent, need)
    notes = [n for n in (dtype_note, info_note) if n]
    with staging(out_dir) as tmp:
        merged = write(tmp)
        notes += [f"untied {k} from {info.tied[k]}: the adapter changes it" for k in merged.untied]
        settings = {"method": method, "into": into, "dtype": dtype_name, "adapter": str(adapter)}
        settings |= {"max_shard_size": max_shard_size, "untied": ", ".join(merged.untied) or "-"}
        if gguf is not None:
            settings["gguf"] = f"{out_dir.name}-{gguf}.gguf"
        tok_src, tok_notes = write_model_files(
            tmp,
            title=out_dir.name,
            adapter=adapter,
            base_dir=base_dir,
            base_ref=base_ref,
            dtype=dtype_name,
            untied=bool(merged.untied),
            settings=settings,
        )
        notes += tok_notes
        report = _maybe_verify(tmp, adapter, ckpt, n_params, into, dtype_name, verify, notes)
        exported = None
        if gguf is not None:
            exported = _export_gguf(tmp, out_dir.name, gguf, n_params, verify, notes, progress)
    return MergeResult(
        out_dir=out_dir,
        base=base_dir,
        adapter_dir=adapter,
        method=method,
        into=into,
        dtype=dtype_name,
        weight_files=tuple(merged.files),
        total_bytes=sum((out_dir / f).stat().st_size for f in merged.files),
        merged_modules=merged.merged_modules,
        replaced_tensors=merged.replaced_tensors,
        untied=tuple(merged.untied),
        tokenizer_source=tok_src,
        verification=report,
        notes=tuple(notes),
        seconds=time.perf_counter() - start,
        gguf=exported.moved_to(out_dir) if exported is not None else None,
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


def _maybe_verify(
    tmp: Path,
    adapter: Path,
    ckpt: BaseCheckpoint,
    n_params: int,
    into: str,
    dtype: str,
    verify: bool | None,
    notes: list[str],
) -> VerifyReport | None:
    from qorpo.merging.verify import verification_budget, verify_merged

    if verify is False:
        return None
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


def _export_gguf(
    tmp: Path,
    name: str,
    out_type: str,
    n_params: int,
    verify: bool | None,
    notes: list[str],
    progress: bool,
) -> GGUFResult:
    """The GGUF into the staging folder; verified under the merge's switch and memory rule."""
    from qorpo.export.run import export_gguf
    from qorpo.export.verify import FP32_COPIES
    from qorpo.merging.verify import verification_budget

    check = verify is True
    if verify is None:
        check, why = verification_budget(n_params, copies=FP32_COPIES)
        if not check:
            notes.append(f"GGUF verification skipped: {why}; pass --verify to force it")
    return export_gguf(tmp, tmp, out_type=out_type, name=name, verify=check, progress=progress)

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

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from qorpo._version import __version__
from qorpo.errors import MergeError, MergeVerificationError
from qorpo.hf import DTYPES, short_dtype_name
from qorpo.merging.adapter import (
    locate_adapter,
    read_adapter_config,
    read_json,
)
from qorpo.merging.checkpoint import (
    BaseCheckpoint,
    numel,
    open_base,
    resolve_base,
)
from qorpo.merging.identity import check_architecture
from qorpo.merging.methods import Merged, prepare
from qorpo.merging.output import tokenizer_source, write_model_files
from qorpo.merging.plan import ModelInfo, model_info
from qorpo.merging.remote import check_custom_code, copy_code
from qorpo.merging.shards import (
    WRITE_ERRNOS,
    WriteError,
    check_disk,
    check_out_dir,
    staging,
    write_error,
    write_marker,
)
from qorpo.merging.summary import summarize, trained_quant

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
    # what the user should act on: a weak check, a merged model far from the trained one
    warnings: tuple[str, ...] = ()


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
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and save it to ``out``.

    ``base`` defaults to the adapter's ``base_model_name_or_path``. ``into="dequantized"`` first
    passes every 4-bit-quantised weight through the NF4 round trip training saw (in
    ``compute_dtype``). ``verify=None`` verifies when the model comfortably fits in RAM.
    ``gguf`` ("f16" | "bf16" | "q8_0"): also write ``out/<out name>-<gguf>.gguf`` and an Ollama
    Modelfile, checked against the merged model under the same ``verify`` switch.
    ``trust_remote_code``: allow a base (or tokenizer) whose ``auto_map`` needs its own Python
    code; without it such a base is refused and no code of it runs.
    ``force`` replaces only an empty folder or an earlier merge's output.
    Raises :class:`MergeError` (nothing written) or :class:`MergeVerificationError`.
    """
    start = time.perf_counter()
    if into not in ("original", "dequantized") or method not in ("stream", "full"):
        raise MergeError(
            f"into must be original|dequantized and method stream|full, got {into!r}, {method!r}"
        )
    adapter = locate_adapter(Path(adapter_dir).expanduser().resolve())
    out_dir = Path(out).expanduser().absolute()
    check_out_dir(out_dir, force, [adapter])  # a bad --out fails before the base is looked up
    base_ref, base_dir, base_config = _locate_base(adapter, base, allow_pickle, trust_remote_code)
    replaced = check_out_dir(out_dir, force, [adapter, base_dir])
    tok_dir = tokenizer_source(adapter, base_dir)
    notes = check_custom_code([base_dir, tok_dir], trust_remote_code)
    if gguf is not None:  # what the export would refuse, refused before the merge
        from qorpo.export.run import preflight

        preflight(base_config, tok_dir, gguf, trust_remote_code=trust_remote_code)
    ckpt = open_base(base_dir, allow_pickle=allow_pickle)
    n_params = sum(numel(shape) for _, shape in ckpt.meta.values())
    dtype_name, dtype_note = resolve_dtype(dtype, base_config)
    info, info_note = _model_info_or_none(
        base_dir, needed=into == "dequantized", trust_remote_code=trust_remote_code
    )
    write, need = prepare(
        adapter, ckpt, info, DTYPES[dtype_name], into=into, method=method,
        max_shard_size=max_shard_size, allow_pickle=allow_pickle, compute_dtype=compute_dtype,
        progress=progress, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    if gguf is not None:
        from qorpo.export.gguf import file_bytes

        need += file_bytes(n_params, gguf)
    check_disk(out_dir.parent, need)
    notes += [n for n in (dtype_note, info_note, replaced) if n]
    settings = {"method": method, "into": into, "dtype": dtype_name, "adapter": str(adapter)}
    settings |= {"max_shard_size": max_shard_size}
    step = partial(
        _write_all, write=write, tied=info.tied, out_dir=out_dir, adapter=adapter,
        base_dir=base_dir, base_ref=base_ref, ckpt=ckpt, n_params=n_params, settings=settings,
        verify=verify, gguf=gguf, notes=notes, progress=progress,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    try:
        with staging(out_dir) as tmp:
            merged, tok_src, report, exported = step(tmp)
    except WriteError as exc:  # the GGUF's, named after the staging folder: say it for out
        raise write_error(exc.os_error, out_dir, need) from None
    except OSError as exc:  # the staging folder is gone already; an earlier output untouched
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise write_error(exc, out_dir, need) from None
    summary = summarize(report, into, trained_quant(adapter)) if report else None
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
        notes=tuple(notes + (summary.notes if summary else [])),
        seconds=time.perf_counter() - start,
        gguf=exported.moved_to(out_dir) if exported is not None else None,
        warnings=tuple(summary.warnings if summary else ()),
    )


def _write_all(
    tmp: Path,
    *,
    write: Callable[[Path], Merged],
    tied: dict[str, str],
    out_dir: Path,
    adapter: Path,
    base_dir: Path,
    base_ref: str,
    ckpt: BaseCheckpoint,
    n_params: int,
    settings: dict[str, Any],
    verify: bool | None,
    gguf: str | None,
    notes: list[str],
    progress: bool,
    trust_remote_code: bool,
) -> tuple[Merged, Path, VerifyReport | None, GGUFResult | None]:
    """Everything into the staging folder: weights, model files, check, GGUF, marker (last)."""
    merged = write(tmp)
    notes += [f"untied {k} from {tied[k]}: the adapter changes it" for k in merged.untied]
    settings["untied"] = ", ".join(merged.untied) or "-"
    if gguf is not None:
        settings["gguf"] = f"{out_dir.name}-{gguf}.gguf"
    if trust_remote_code:
        copied = copy_code([base_dir], tmp)
        notes += [f"copied the base's custom code: {', '.join(copied)}"] if copied else []
    tok_src, tok_notes = write_model_files(
        tmp,
        title=out_dir.name,
        adapter=adapter,
        base_dir=base_dir,
        base_ref=base_ref,
        dtype=settings["dtype"],
        untied=bool(merged.untied),
        settings=settings,
        trust_remote_code=trust_remote_code,
    )
    notes += tok_notes
    report = _maybe_verify(
        tmp, adapter, ckpt, n_params, settings["into"], settings["dtype"], verify, notes,
        trust_remote_code,
    )  # fmt: skip
    exported = None
    if gguf is not None:
        exported = _export_gguf(
            tmp, out_dir.name, gguf, n_params, verify, notes, progress, trust_remote_code
        )
    write_marker(tmp, {"qorpo_version": __version__, "adapter": str(adapter),
                       "base": str(base_dir), **settings})
    return merged, tok_src, report, exported


def _locate_base(
    adapter: Path, base: str | os.PathLike[str] | None, allow_pickle: bool, trust_remote_code: bool
) -> tuple[str, Path, dict[str, Any]]:
    """The base model (reference, folder, config): ``base`` or the adapter's, not pre-quantized,
    of the architecture the adapter was trained on."""
    adapter_cfg = read_adapter_config(adapter)
    base_ref = str(base) if base is not None else adapter_cfg.get("base_model_name_or_path")
    if not base_ref:
        raise MergeError(
            f"{adapter}/adapter_config.json names no base_model_name_or_path; pass --base"
        )
    base_dir = resolve_base(
        base_ref,
        revision=adapter_cfg.get("revision"),
        allow_pickle=allow_pickle,
        code=trust_remote_code,
    )
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"base model folder {base_dir} has no config.json; pass --base")
    base_config = read_json(base_dir / "config.json")
    if base_config.get("quantization_config"):
        raise MergeError(
            f"base {base_dir} is a pre-quantized checkpoint "
            f"({base_config['quantization_config'].get('quant_method')}); "
            "merge into the original 16/32-bit model instead: pass --base <original model>"
        )
    check_architecture(adapter, adapter_cfg, base_dir, base_config)
    return base_ref, base_dir, base_config


def _model_info_or_none(
    base_dir: Path, *, needed: bool, trust_remote_code: bool
) -> tuple[ModelInfo, str | None]:
    try:
        return model_info(base_dir, trust_remote_code=trust_remote_code), None
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
    trust_remote_code: bool,
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
        trust_remote_code=trust_remote_code,
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
    trust_remote_code: bool,
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
    return export_gguf(tmp, tmp, out_type=out_type, name=name, verify=check, progress=progress,
                       trust_remote_code=trust_remote_code)

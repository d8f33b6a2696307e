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
from qorpo.merging.options import MergeConfig
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
    adapter_dir: MergeConfig | str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    progress: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    **options: Any,
) -> MergeResult:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model and save it to ``out``.

    ``adapter_dir`` may be a :class:`MergeConfig` instead (keywords override its fields); the
    keywords are MergeConfig's fields (docs/merge.md): ``base`` defaults to the adapter's
    ``base_model_name_or_path``; ``into="dequantized"`` first passes every 4-bit-quantised
    weight through the NF4 round trip training saw (in ``compute_dtype``); ``verify=None``
    verifies when the model comfortably fits in RAM; ``gguf`` ("f16" | "bf16" | "q8_0") also
    writes ``out/<out name>-<gguf>.gguf`` and an Ollama Modelfile, checked under the same
    ``verify`` switch; ``trust_remote_code`` allows a base whose ``auto_map`` needs its own
    code; ``force`` replaces only an empty folder or an earlier merge's output.
    Raises :class:`ConfigError` (bad options), :class:`MergeError` (nothing written) or
    :class:`MergeVerificationError`.
    """
    start = time.perf_counter()
    cfg = MergeConfig.of(adapter_dir, out, **options)
    inputs = _inputs(cfg)
    prepared = _prepare(cfg, inputs, progress=progress, compute_dtype=compute_dtype)
    settings = {"method": cfg.method, "into": cfg.into, "dtype": prepared.dtype,
                "adapter": str(inputs.adapter), "max_shard_size": cfg.max_shard_size}
    step = partial(_write_all, cfg=cfg, inputs=inputs, prepared=prepared, settings=settings,
                   progress=progress)
    out_dir = inputs.out_dir
    written = _staged(step, out_dir, prepared.need)
    report, merged = written.report, written.merged
    summary = summarize(report, cfg.into, trained_quant(inputs.adapter)) if report else None
    return MergeResult(
        out_dir=out_dir,
        base=inputs.base_dir,
        adapter_dir=inputs.adapter,
        method=cfg.method,
        into=cfg.into,
        dtype=prepared.dtype,
        weight_files=tuple(merged.files),
        total_bytes=sum((out_dir / f).stat().st_size for f in merged.files),
        merged_modules=merged.merged_modules,
        replaced_tensors=merged.replaced_tensors,
        untied=tuple(merged.untied),
        tokenizer_source=written.tokenizer_source,
        verification=report,
        notes=inputs.notes + prepared.notes + written.notes + tuple(summary.notes if summary
                                                                   else ()),
        seconds=time.perf_counter() - start,
        gguf=written.gguf.moved_to(out_dir) if written.gguf is not None else None,
        warnings=tuple(summary.warnings if summary else ()),
    )


def _staged(step: Callable[[Path], _Written], out_dir: Path, need: int) -> _Written:
    """``step`` into a staging folder renamed onto ``out_dir`` when it succeeds; a full disk
    is one sentence naming ``out_dir`` and the space needed."""
    try:
        with staging(out_dir) as tmp:
            return step(tmp)
    except WriteError as exc:  # the GGUF's, named after the staging folder: say it for out
        raise write_error(exc.os_error, out_dir, need) from None
    except OSError as exc:  # the staging folder is gone already; an earlier output untouched
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise write_error(exc, out_dir, need) from None


class _Inputs(NamedTuple):
    """The merge's inputs, found and checked before anything is read in bulk."""

    adapter: Path
    out_dir: Path
    base_ref: str  # as the user or the adapter named it
    base_dir: Path
    base_config: dict[str, Any]
    tokenizer_dir: Path
    replaced: str | None  # the note that an earlier merge in out_dir will be replaced
    notes: tuple[str, ...]


def _inputs(cfg: MergeConfig) -> _Inputs:
    """Adapter, output folder, base and tokenizer: located and checked, cheapest first."""
    adapter = locate_adapter(Path(str(cfg.adapter)).expanduser().resolve())
    out_dir = Path(str(cfg.out)).expanduser().absolute()
    check_out_dir(out_dir, cfg.force, [adapter])  # a bad --out fails before the base is looked up
    base_ref, base_dir, base_config = _locate_base(
        adapter, cfg.base, cfg.allow_pickle, cfg.trust_remote_code
    )
    replaced = check_out_dir(out_dir, cfg.force, [adapter, base_dir])
    tok_dir = tokenizer_source(adapter, base_dir)
    notes = check_custom_code([base_dir, tok_dir], cfg.trust_remote_code)
    if cfg.gguf is not None:  # what the export would refuse, refused before the merge
        from qorpo.export.run import preflight

        preflight(base_config, tok_dir, cfg.gguf, trust_remote_code=cfg.trust_remote_code)
    return _Inputs(adapter, out_dir, base_ref, base_dir, base_config, tok_dir, replaced,
                   tuple(notes))


class _Prepared(NamedTuple):
    """The merge method, ready to write, and what it needs."""

    ckpt: BaseCheckpoint
    n_params: int
    dtype: str  # the output dtype's short name
    tied: dict[str, str]  # tied weight -> the weight it shares
    write: Callable[[Path], Merged]
    need: int  # bytes the output takes on disk
    notes: tuple[str, ...]


def _prepare(
    cfg: MergeConfig, inputs: _Inputs, *, progress: bool, compute_dtype: torch.dtype
) -> _Prepared:
    """Open the base, plan the method (a streaming plan fails here, before any write) and check
    the disk has room."""
    ckpt = open_base(inputs.base_dir, allow_pickle=cfg.allow_pickle)
    n_params = sum(numel(shape) for _, shape in ckpt.meta.values())
    dtype_name, dtype_note = resolve_dtype(cfg.dtype, inputs.base_config)
    info, info_note = _model_info_or_none(
        inputs.base_dir, needed=cfg.into == "dequantized", trust_remote_code=cfg.trust_remote_code
    )
    write, need = prepare(
        inputs.adapter, ckpt, info, DTYPES[dtype_name], into=cfg.into, method=cfg.method,
        max_shard_size=cfg.max_shard_size, allow_pickle=cfg.allow_pickle,
        compute_dtype=compute_dtype, progress=progress, trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip
    if cfg.gguf is not None:
        from qorpo.export.gguf import file_bytes

        need += file_bytes(n_params, cfg.gguf)
    check_disk(inputs.out_dir.parent, need)
    notes = tuple(n for n in (dtype_note, info_note, inputs.replaced) if n)
    return _Prepared(ckpt, n_params, dtype_name, info.tied, write, need, notes)


class _Written(NamedTuple):
    """What went into the staging folder."""

    merged: Merged
    tokenizer_source: Path
    report: VerifyReport | None
    gguf: GGUFResult | None
    notes: tuple[str, ...]


def _write_all(
    tmp: Path,
    *,
    cfg: MergeConfig,
    inputs: _Inputs,
    prepared: _Prepared,
    settings: dict[str, Any],
    progress: bool,
) -> _Written:
    """Everything into the staging folder: weights, model files, check, GGUF, marker (last)."""
    merged = prepared.write(tmp)
    notes = [f"untied {k} from {prepared.tied[k]}: the adapter changes it" for k in merged.untied]
    settings["untied"] = ", ".join(merged.untied) or "-"
    if cfg.gguf is not None:
        settings["gguf"] = f"{inputs.out_dir.name}-{cfg.gguf}.gguf"
    if cfg.trust_remote_code:
        copied = copy_code([inputs.base_dir], tmp)
        notes += [f"copied the base's custom code: {', '.join(copied)}"] if copied else []
    tok_src, tok_notes = write_model_files(
        tmp,
        title=inputs.out_dir.name,
        adapter=inputs.adapter,
        base_dir=inputs.base_dir,
        base_ref=inputs.base_ref,
        dtype=prepared.dtype,
        untied=bool(merged.untied),
        settings=settings,
        trust_remote_code=cfg.trust_remote_code,
    )
    notes += tok_notes
    checked = _maybe_verify(tmp, cfg, inputs.adapter, prepared.ckpt, prepared.n_params,
                            prepared.dtype)
    notes += checked.notes
    exported = None
    if cfg.gguf is not None:
        exported = _export_gguf(tmp, inputs.out_dir.name, cfg, prepared.n_params, progress)
        notes += exported.notes
    write_marker(tmp, {"qorpo_version": __version__, "adapter": str(inputs.adapter),
                       "base": str(inputs.base_dir), **settings})
    gguf = exported.result if exported is not None else None
    return _Written(merged, tok_src, checked.report, gguf, tuple(notes))


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


class _Checked(NamedTuple):
    report: VerifyReport | None  # None: not verified (switched off, or too large for RAM)
    notes: tuple[str, ...]


def _maybe_verify(
    tmp: Path, cfg: MergeConfig, adapter: Path, ckpt: BaseCheckpoint, n_params: int, dtype: str
) -> _Checked:
    from qorpo.merging.verify import verification_budget, verify_merged

    if cfg.verify is False:
        return _Checked(None, ())
    ok, why = verification_budget(n_params)
    if cfg.verify is None and not ok:
        return _Checked(None, (f"verification skipped: {why}; pass --verify to force it",))
    report = verify_merged(
        tmp,
        adapter,
        ckpt.path,
        into=cfg.into,
        dtype=dtype,
        use_safetensors=not ckpt.pickle,
        other=None if ok else False,
        trust_remote_code=cfg.trust_remote_code,
    )
    if not report.passed:
        raise MergeVerificationError(
            f"merged model disagrees with base + adapter: {report.summary()}", report
        )
    return _Checked(report, ())


class _Exported(NamedTuple):
    result: GGUFResult
    notes: tuple[str, ...]


def _export_gguf(
    tmp: Path, name: str, cfg: MergeConfig, n_params: int, progress: bool
) -> _Exported:
    """The GGUF into the staging folder; verified under the merge's switch and memory rule."""
    from qorpo.export.run import export_gguf
    from qorpo.export.verify import FP32_COPIES
    from qorpo.merging.verify import verification_budget

    check, notes = cfg.verify is True, ()
    if cfg.verify is None:
        check, why = verification_budget(n_params, copies=FP32_COPIES)
        if not check:
            notes = (f"GGUF verification skipped: {why}; pass --verify to force it",)
    result = export_gguf(tmp, tmp, out_type=str(cfg.gguf), name=name, verify=check,
                         progress=progress, trust_remote_code=cfg.trust_remote_code)
    return _Exported(result, notes)

"""``export_gguf()``: a merged model folder -> ``OUT/<name>-<type>.gguf`` (f16 | bf16 | q8_0) and
an Ollama ``<name>-<type>.Modelfile`` next to it.

``qorpo merge --gguf TYPE`` calls it on the merge's staging folder, so the GGUF appears (or not)
together with the merged model; it also works on any folder ``qorpo merge`` wrote. The file is
written under a temporary name next to its target (``qorpo.atomic``), verified
(``export/verify.py``) and only then renamed into place.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf

from qorpo.atomic import replacing
from qorpo.errors import MergeError, MergeVerificationError
from qorpo.export.gguf import (
    OUT_TYPES,
    check_config,
    file_bytes,
    need,
    plan_tensors,
    read_config,
    rope_freqs,
    write_gguf,
)
from qorpo.export.vocab import tokenizer_meta, write_modelfile

if TYPE_CHECKING:
    from qorpo.export.verify import GGUFVerifyReport


class GGUFResult(NamedTuple):
    """What :func:`export_gguf` wrote."""

    path: Path
    modelfile: Path
    out_type: str
    arch: str  # GGUF architecture name ("llama", "qwen2")
    tensors: int
    bytes: int
    seconds: float
    verification: GGUFVerifyReport | None

    def moved_to(self, folder: Path) -> GGUFResult:
        """The same files after their folder was renamed to ``folder``."""
        return self._replace(path=folder / self.path.name, modelfile=folder / self.modelfile.name)


def preflight(
    config: dict[str, Any], tokenizer_dir: Path, out_type: str, *, trust_remote_code: bool = False
) -> None:
    """Raise :class:`MergeError` now for what the export would refuse later: the type, the
    architecture, hyper-parameters, rope scaling, the tokenizer kind and its pre-tokenizer."""
    check_config(config, out_type)
    tokenizer_meta(tokenizer_dir, need(config, "vocab_size"), trust_remote_code)


def export_gguf(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    out_type: str = "f16",
    name: str | None = None,
    force: bool = False,
    verify: bool = True,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> GGUFResult:
    """Write ``<out_dir>/<name>-<out_type>.gguf`` (+ ``.Modelfile``) from a merged model folder.

    ``out_dir`` defaults to ``model_dir``, ``name`` to its folder name. With ``verify`` (default)
    the file is read back by transformers' GGUF loader and compared with the HF model before it
    gets its final name. ``trust_remote_code``: allow a folder whose ``auto_map`` needs its own
    code (refused otherwise; no code of it runs). Raises :class:`MergeError` (nothing written)
    or :class:`MergeVerificationError` (nothing written; ``.report`` says what differed).
    """
    from qorpo.merging.remote import check_custom_code

    start = time.perf_counter()
    src = Path(model_dir)
    config = read_config(src)
    check_custom_code([src], trust_remote_code)
    family = check_config(config, out_type)
    out = Path(out_dir) if out_dir is not None else src
    name = name or src.resolve().name
    stem = f"{name}-{out_type}"
    final, modelfile = out / f"{stem}.gguf", out / f"{stem}.Modelfile"
    for path in (final, modelfile):
        if path.exists() and not force:
            raise MergeError(f"{path} already exists; pass --force (force=True) to replace it")
    plan = plan_tensors(src, config, family, OUT_TYPES[out_type][0])
    meta = tokenizer_meta(src, need(config, "vocab_size"), trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    report = None
    try:
        with replacing(final) as tmp:
            write_gguf(tmp, config, family, plan, meta, out_type, name, progress)
            if verify:
                from qorpo.export.verify import verify_gguf

                report = verify_gguf(
                    src, tmp, out_type=out_type, trust_remote_code=trust_remote_code
                )
                if not report.passed:
                    raise MergeVerificationError(
                        f"the GGUF file disagrees with the model it was exported from:\n"
                        f"{report.summary()}",
                        report,
                    )
            write_modelfile(modelfile, final.name, meta)  # then the GGUF is renamed into place
    except OSError as exc:  # the temp file is gone; an earlier GGUF of that name untouched
        from qorpo.merging.shards import WRITE_ERRNOS, write_error

        if exc.errno not in WRITE_ERRNOS:
            raise
        weights = sum(math.prod(t.shape) for t in plan)
        raise write_error(exc, final, file_bytes(weights, out_type), "the GGUF file") from None
    from qorpo.merging.shards import add_to_marker

    # into a merged folder: the files become that merge's, so a later --force may replace them
    add_to_marker(out, [final.name, modelfile.name])
    has_rope_freqs = rope_freqs(config) is not None  # the one tensor not from the checkpoint
    return GGUFResult(
        final, modelfile, out_type, gguf.MODEL_ARCH_NAMES[family.arch], len(plan) + has_rope_freqs,
        final.stat().st_size, time.perf_counter() - start, report,
    )

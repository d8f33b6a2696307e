"""Reading the merge's inputs without loading them: base checkpoints indexed from their
safetensors headers and read one tensor at a time, adapter tensor files, the pickle policy, and
the base model's folder (local, or a hub id from the local HF cache)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from qorpo.errors import MergeError

# safetensors header dtype names
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return ST_DTYPES[dtype].itemsize * numel(shape)


def load_tensors(folder: Path, stem: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st_file, bin_file = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
    if st_file.is_file():
        from safetensors.torch import load_file

        with unreadable(st_file):
            return load_file(str(st_file))
    if bin_file.is_file():
        check_pickle(bin_file, allow_pickle)
        with unreadable(bin_file):
            return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    raise MergeError(f"no {stem}.safetensors (or .bin) in {folder}")


@contextmanager
def unreadable(path: Path) -> Iterator[None]:
    """A weights file that does not parse (cut short by an interrupted copy or save, damaged)
    is the user's to fix: one MergeError naming it instead of the reader's traceback."""
    try:
        yield
    except MergeError:
        raise
    except OSError as exc:  # unreadable, not malformed: say why (permission denied, ...)
        raise MergeError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        malformed = (ValueError, RuntimeError, EOFError, KeyError, TypeError, struct.error)
        if not isinstance(exc, malformed) and type(exc).__name__ != "SafetensorError":
            raise
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        raise MergeError(
            f"{path} cannot be read ({reason}): the file is damaged or cut short (an "
            "interrupted copy or save?); copy or save it again"
        ) from None


def check_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise MergeError(
            f"{path} is a pickle (.bin) file, which can run code when loaded. Convert it to "
            "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it; it is then "
            "read with torch.load(weights_only=True)."
        )


@dataclass
class BaseCheckpoint:
    """The base model's weight files, known from their headers only (nothing loaded)."""

    path: Path
    files: list[Path]
    meta: dict[str, tuple[str, tuple[int, ...]]]  # key -> (safetensors dtype, shape), file order
    where: dict[str, Path]
    pickle: bool

    @contextmanager
    def reader(self, file: Path) -> Iterator[Callable[[str], torch.Tensor]]:
        """Tensor getter for one file that keeps at most one tensor's pages in memory."""
        if self.pickle:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            yield lambda key: state[key].contiguous()
            del state
            return
        yield partial(_read_tensor, file)

    def get(self, key: str) -> torch.Tensor:
        with self.reader(self.where[key]) as get:
            return get(key)


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor via safe_open, opened per tensor on purpose.

    safe_open hands out zero-copy views of one mmap of the whole file; every page touched stays
    resident (and counted in RSS) while the handle is open, so reading a 5 GB shard through one
    handle peaks at ~5 GB. A handle per tensor unmaps each tensor once it has been written, so
    the peak is the largest tensor instead (header re-parsing costs ~0.1 ms).
    """
    from safetensors import safe_open

    with unreadable(file), safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table, checked against the file's size (a copy cut short is caught here,
    before anything is written, rather than mid-merge)."""
    with unreadable(path), open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > path.stat().st_size - 8:
            raise ValueError(f"header of {size} bytes, file of {path.stat().st_size}")
        header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + size + end > path.stat().st_size:
            raise ValueError(f"{8 + size + end} bytes expected, {path.stat().st_size} present")
    return dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))


def open_base(base_dir: Path, *, allow_pickle: bool = False) -> BaseCheckpoint:
    """Index the base checkpoint (safetensors, or .bin with ``allow_pickle``)."""
    for stem, ext, pickle in (("model", "safetensors", False), ("pytorch_model", "bin", True)):
        index, single = base_dir / f"{stem}.{ext}.index.json", base_dir / f"{stem}.{ext}"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({base_dir / f for f in weight_map.values()})
        elif single.is_file():
            files = [single]
        else:
            continue
        if pickle:
            check_pickle(files[0], allow_pickle)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MergeError(
                f"base checkpoint {base_dir} is incomplete: {missing[0].name} is missing"
            )
        meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        where: dict[str, Path] = {}
        for file in files:
            for key, (dtype, shape) in _file_meta(file, pickle).items():
                meta[key], where[key] = (dtype, shape), file
        return BaseCheckpoint(base_dir, files, meta, where, pickle)
    raise MergeError(f"no model.safetensors / model.safetensors.index.json in {base_dir}")


def _file_meta(file: Path, pickle: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    if not pickle:
        meta = {k: (v["dtype"], tuple(v["shape"])) for k, v in _safetensors_header(file).items()}
        odd = next((k for k, (dt, _) in meta.items() if dt not in ST_DTYPES), None)
        if odd is not None:
            raise MergeError(f"{file.name}: tensor {odd!r} has unsupported dtype {meta[odd][0]}")
        return meta
    with unreadable(file):
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    return {k: (ST_NAMES[t.dtype], tuple(t.shape)) for k, t in state.items()}


def resolve_base(
    ref: str, *, revision: str | None = None, allow_pickle: bool = False, code: bool = False
) -> Path:
    """A local folder, else a hub id looked up in the local HF cache (then downloaded if online).
    ``code``: the repo's Python files too (--trust-remote-code)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or ref.startswith(".") or ref.count("/") > 1:
        raise MergeError(f"base model folder {ref} does not exist; pass --base /path/to/base")
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    patterns += ["*.bin"] if allow_pickle else []
    patterns += ["*.py"] if code else []
    try:
        return Path(
            snapshot_download(
                ref, revision=revision, local_files_only=True, allow_patterns=patterns
            )
        )
    except Exception as exc:  # noqa: BLE001 - not cached (or partial): maybe download below
        cache_error = exc
    if constants.HF_HUB_OFFLINE:
        raise MergeError(
            f"base model {ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it (`hf download {ref}`) or pass --base /path/to/base ({cache_error})"
        )
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001
        raise MergeError(f"cannot find or download base model {ref!r}: {exc}; pass --base") from exc

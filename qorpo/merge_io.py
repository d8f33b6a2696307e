"""Files of the merge: reading adapter/base tensors (safetensors headers, one tensor at a
time), hub-cache resolution of the base, safetensors shard writing, and the disk/output checks
and temp-folder staging that make the final publish atomic."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qorpo.merge_common import ST_DTYPES, ST_NAMES, MergeError, nbytes

if TYPE_CHECKING:
    from qorpo.merge_plan import Item


# ----------------------------------------------------------------------------- adapter files


def load_tensors(folder: Path, stem: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st_file, bin_file = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
    if st_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(st_file))
    if bin_file.is_file():
        check_pickle(bin_file, allow_pickle)
        return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    raise MergeError(f"no {stem}.safetensors (or .bin) in {folder}")


def check_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise MergeError(
            f"{path} is a pickle (.bin) file, which can run code when loaded. Convert it to "
            "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it; it is then "
            "read with torch.load(weights_only=True)."
        )


# ----------------------------------------------------------------------------- base checkpoint


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

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
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
    state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    return {k: (ST_NAMES[t.dtype], tuple(t.shape)) for k, t in state.items()}


# ----------------------------------------------------------------------------- writing


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '200KB' / bytes -> bytes (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise MergeError(f"cannot parse size {size!r}: use e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * base**power)


def plan_shards(items: list[Item], max_bytes: int) -> list[list[Item]]:
    """Greedy split in write order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item.dtype, item.shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes safetensors shards whose header is known up front, one tensor at a time.

    Planning the layout first (names, dtypes, shapes) lets each tensor go straight to disk
    instead of buffering a whole output shard in memory.
    """

    def __init__(self, folder: Path, shards: list[list[Item]]) -> None:
        self.folder = folder
        self.shards = shards
        self.names = shard_names(len(shards))
        self._queue = [(i, item) for i, shard in enumerate(shards) for item in shard]
        self._pos = 0
        self._shard = -1
        self._fh: Any = None

    def _open_shard(self, index: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for item in self.shards[index]:
            n = nbytes(item.dtype, item.shape)
            header[item.key] = {
                "dtype": item.dtype,
                "shape": list(item.shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._fh = open(self.folder / self.names[index], "wb")  # noqa: SIM115 - closed in _finish_shard
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = index

    def _finish_shard(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        index, item = self._queue[self._pos]
        if (
            key != item.key
            or ST_NAMES[tensor.dtype] != item.dtype
            or tuple(tensor.shape) != item.shape
        ):
            raise MergeError(
                f"internal error: got {key} {tensor.dtype} {tuple(tensor.shape)}, planned {item}"
            )
        if index != self._shard:
            if self._fh is not None:
                self._finish_shard()
            self._open_shard(index)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._queue):
            raise MergeError(f"internal error: wrote {self._pos} of {len(self._queue)} tensors")
        if self._fh is not None:
            self._finish_shard()
        if len(self.shards) > 1:
            weight_map = {
                it.key: n for n, shard in zip(self.names, self.shards, strict=True) for it in shard
            }
            total = sum(nbytes(it.dtype, it.shape) for shard in self.shards for it in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ----------------------------------------------------------------------------- base resolution


def resolve_base(ref: str, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder, else a hub id looked up in the local HF cache (then downloaded if online)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or ref.startswith(".") or ref.count("/") > 1:
        raise MergeError(f"base model folder {ref} does not exist; pass --base /path/to/base")
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    patterns += ["*.bin"] if allow_pickle else []
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


# ----------------------------------------------------------------------------- safety


def check_out_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    for inp in inputs:
        if out == inp.resolve() or out in inp.resolve().parents:
            raise MergeError(f"output {out} would overwrite the input {inp}; choose another --out")
    if out.exists() and not force:
        raise MergeError(f"{out} already exists; pass --force (force=True) to replace it")


def check_disk(parent: Path, need: int) -> None:
    free = shutil.disk_usage(parent).free
    margin = need // 20 + 64 * 2**20  # tokenizer, index, filesystem slack
    if free < need + margin:
        raise MergeError(
            f"not enough disk space in {parent}: the merged model needs about "
            f"{(need + margin) / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temp folder next to ``out``, renamed onto it only when everything succeeded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:  # Ctrl-C included: never leave a half-written model behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():  # --force: move the old one aside so the swap is a rename
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the previous model back
            os.replace(old / "x", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

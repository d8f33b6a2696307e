"""Writing the merged model: output shards planned up front and filled one tensor at a time, the
output-folder and disk checks, and the temp-folder staging that makes the final publish atomic."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qorpo.atomic import remove_stale, temp_dir
from qorpo.errors import MergeError
from qorpo.merging.checkpoint import ST_NAMES, nbytes

if TYPE_CHECKING:
    from qorpo.merging.plan import Item


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
    """A temp folder next to ``out``, renamed onto it only when everything succeeded.

    Leftovers of a killed merge to the same ``out`` (no cleanup code runs on SIGKILL) are
    removed first; a crash, Ctrl-C or SIGTERM in this one removes its own temp folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temp_dir(out)
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:  # Ctrl-C included: never leave a half-written model behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():  # --force: move the old one aside so the swap is a rename
        old = temp_dir(out, "old")
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

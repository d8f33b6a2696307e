"""Writing the merged model: output shards planned up front and filled one tensor at a time, the
output-folder and disk checks, and the temp-folder staging that makes the final publish atomic."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qorpo.atomic import replacing, replacing_folder
from qorpo.errors import MergeError
from qorpo.merging.checkpoint import ST_NAMES, nbytes

# a temp folder next to the output, renamed onto it only when everything succeeded (a crash,
# Ctrl-C or SIGTERM removes it; leftovers of a killed merge to the same output go first)
staging = replacing_folder

if TYPE_CHECKING:
    from qorpo.merging.plan import Item


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


MARKER = "qorpo_merge.json"  # written last into every merged folder: what the merge wrote


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    for cand in (path, *path.parents):
        if cand.exists():
            return cand
    return Path(path.anchor or ".")


def check_out_dir(out: Path, force: bool, inputs: list[Path]) -> str | None:
    """Refuse an --out that cannot or must not be written, before any work.

    ``force`` replaces only an empty folder or one an earlier merge wrote (its marker lists
    every file in it): never a folder of the user's, nor a merge folder they added files to.
    Returns a note when an earlier merge will be replaced."""
    where = existing_ancestor(out.parent)
    if not where.is_dir():
        raise MergeError(f"--out {out}: {where} is a file, not a folder; choose another --out")
    if not os.access(where, os.W_OK | os.X_OK):
        raise MergeError(f"--out {out}: cannot write in {where} (permission denied); "
                         "choose another --out")
    for inp in inputs:
        if out == inp.resolve() or out in inp.resolve().parents:
            raise MergeError(f"output {out} would overwrite the input {inp}; choose another --out")
    if not out.exists():
        return None
    if not out.is_dir():
        raise MergeError(f"--out {out} is a file; choose another --out (a folder)")
    if not force:
        raise MergeError(f"{out} already exists; pass --force (force=True) to replace it (only "
                         "an earlier merge's output folder is replaced)")
    return _replaceable(out)


def _replaceable(out: Path) -> str | None:
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return None
    marker = read_marker(out)
    if marker is None:
        raise MergeError(
            f"--force replaces only a folder an earlier `qorpo merge` wrote, and {out} is not "
            f"one (it has no {MARKER}); choose another --out, or move that folder away yourself"
        )
    extra = [n for n in names if n != MARKER and n not in marker["files"]]
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise MergeError(
            f"{out} holds files the earlier merge did not write ({shown}); --force would delete "
            "them: move them out of that folder, or choose another --out"
        )
    return (f"replaced the earlier merge in {out} (of {marker.get('adapter', '?')}, written "
            f"{marker.get('written_at', '?')})")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The merge marker of ``folder``, or None when it has no valid one."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None
    return marker


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Record every top-level entry of ``folder`` (name -> bytes, 0 for a folder), last."""
    files = {p.name: (p.stat().st_size if p.is_file() else 0)
             for p in sorted(folder.iterdir()) if p.name != MARKER}
    marker = {**info, "written_at": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def add_to_marker(folder: Path, names: list[str]) -> None:
    """Files written later into a merged folder (a GGUF export) become the merge's too."""
    marker = read_marker(folder)
    if marker is None:
        return
    for name in names:
        path = folder / name
        marker["files"][name] = path.stat().st_size if path.is_file() else 0
    with replacing(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=2) + "\n")


def check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(existing_ancestor(folder)).free
    margin = need // 20 + 64 * 2**20  # tokenizer, index, filesystem slack
    if free < need + margin:
        raise MergeError(
            f"not enough disk space in {folder}: the merged model needs about "
            f"{(need + margin) / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


# a full disk, a quota, a filesystem turned read-only: the machine's problem, said in one line
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class WriteError(MergeError):
    """Writing failed for want of space (or a read-only filesystem); ``os_error`` is why."""

    def __init__(self, message: str, os_error: OSError) -> None:
        super().__init__(message)
        self.os_error = os_error


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def write_error(exc: OSError, out: Path, need: int, what: str = "the merged model") -> WriteError:
    """A full disk (or a folder that turned read-only) while writing: one sentence naming the
    folder and the space needed; the caller has already removed what it half wrote."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(existing_ancestor(out.parent)).free
        return WriteError(
            f"the disk filled up while writing {what} to {out}: it needs about {_size(need)} "
            f"({need:,} bytes), {_size(free)} are free, so nothing was written (an earlier "
            f"{out.name} is untouched); free some space or choose another --out",
            exc,
        )
    return WriteError(f"cannot write {what} to {out}: {exc.strerror or exc}; nothing was "
                      "written; choose another --out", exc)

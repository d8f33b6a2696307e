"""Write somewhere hidden, then rename: how every finished result (merged model, demo model,
GGUF file) appears all at once or not at all.

Temp names carry the host and process id (`.NAME.tmp-HOST-PID-XXXX`), so a later run can tell
the leftovers of a killed process (`kill -9`, power loss: no cleanup code runs) from a run
still in progress, and removes only its own kind of leftovers for the same target.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def temp_dir(target: Path, kind: str = "tmp") -> Path:
    """A new hidden folder next to `target` (same filesystem: the final rename is atomic),
    with the permissions a plain mkdir would give (mkdtemp's 0700 would lock out the serving
    process or other users once it is renamed into place)."""
    path = Path(tempfile.mkdtemp(prefix=f"{_prefix(target, kind)}{_HOST}-{os.getpid()}-",
                                 dir=target.parent))
    path.chmod(0o777 & ~_umask())
    return path


def temp_file(target: Path, kind: str = "tmp") -> Path:
    """A new hidden, empty file next to `target`, with a plain open()'s permissions."""
    fd, name = tempfile.mkstemp(prefix=f"{_prefix(target, kind)}{_HOST}-{os.getpid()}-",
                                dir=target.parent)
    os.close(fd)
    path = Path(name)
    path.chmod(0o666 & ~_umask())
    return path


@contextmanager
def replacing(target: Path, kind: str = "tmp") -> Iterator[Path]:
    """Write `target` through a temp file next to it: yields the temp file's path; when the block
    finishes, the file is flushed to disk and renamed onto `target` (replacing it); when it
    raises (Ctrl-C included), the temp file is removed and `target` is left as it was. Temp
    files of dead processes for the same `target` are removed first."""
    remove_stale(target, (kind,))
    tmp = temp_file(target, kind)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # a no-op after the rename


@contextmanager
def replacing_folder(target: Path) -> Iterator[Path]:
    """`replacing` for a folder: yields a new empty temp folder next to `target`; when the block
    finishes, it is renamed onto `target` (an existing `target` is moved aside first, removed
    after, put back if the rename fails); when it raises (Ctrl-C included), the temp folder is
    removed and `target` is left as it was. Leftovers of dead processes are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = temp_dir(target)
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except BaseException:  # Ctrl-C included: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():  # a folder cannot be renamed onto a non-empty one: move it aside
        old = temp_dir(target, "old")
        os.replace(target, old / "x")
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:  # put the previous folder back
            os.replace(old / "x", target)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(target: Path, kinds: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """Remove temp folders/files for `target` left by processes of this host that are gone.
    Returns what was removed."""
    removed = []
    for kind in kinds:
        for path in target.parent.glob(_prefix(target, kind) + "*"):
            m = re.match(re.escape(_prefix(target, kind)) + r"(.+)-(\d+)-[^-]+$", path.name)
            if m is None or m.group(1) != _HOST or _alive(int(m.group(2))):
                continue  # another host's, a live process's, or not ours
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sha256_file(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks (checkpoint markers, the demo wheel)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

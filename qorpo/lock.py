"""One writer per output folder: a lock file taken before anything is written there.

`hold(folder)` creates `folder/.qorpo.lock` atomically (a temp file hard-linked into place, so
the lock never exists half written) holding who owns it: host, pid, the pid's start time (a
recycled pid is not taken for the owner), its PID namespace, the command and the launch id.
A second run into the same folder is refused while the owner lives. A lock left by a dead
process of this host (`kill -9`, power loss: no cleanup code ran) is taken over with a note; a
lock of another host cannot be checked and is refused, saying how to remove it. Ranks of one
`torchrun`/`accelerate launch` share rank 0's lock. Taking the lock also proves the folder is
writable, before any model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import qorpo.atomic as atomic
from qorpo.atomic import _HOST, _alive
from qorpo.errors import QorpoError

try:
    import fcntl
except ImportError:  # Windows: breakers of stale locks go unguarded
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".qorpo.lock"
_UNREADABLE_GRACE_S = 10.0  # an unreadable lock younger than this may be mid-write
_TRIES = 5
_EXITED = "exited"  # a zombie's token: it has exited, its parent has not reaped it yet
# Errors that mean "this folder cannot be written", not "this filesystem has no hard links".
_UNWRITABLE = {errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class LockedError(QorpoError, RuntimeError):
    """Another qorpo run holds the folder (or may: another host's lock cannot be checked)."""


class UnwritableFolderError(QorpoError, RuntimeError):
    """The folder cannot be created or written to (permissions, read-only, full)."""


class Owner(NamedTuple):
    """Who holds a lock: the JSON record in the lock file."""

    host: str
    pid: int
    started: str | None  # boot id + start time of `pid` (Linux); None where unknown
    pidns: str | None  # PID namespace: a pid means nothing in another container
    command: str
    launch: str | None  # TORCHELASTIC_RUN_ID or MASTER_ADDR:MASTER_PORT of a launch
    since: float

    def describe(self) -> str:
        cmd = self.command if len(self.command) <= 120 else self.command[:117] + "..."
        return f"pid {self.pid} on host {self.host} since {_when(self.since)}, `{cmd}`"


@dataclass
class FolderLock:
    """A held lock (or, on ranks other than 0 of a launch, a no-op one: `path` is None)."""

    folder: Path
    path: Path | None
    owner: Owner | None
    created: Path | None = None  # the top-most folder this lock created (None: it existed)
    note: str | None = None  # "took over the lock of a dead run ...": the caller prints it

    def release(self) -> None:
        """Remove the lock if it is still ours; then remove the folders it created if they
        are empty (the run failed before writing anything). Idempotent."""
        if self.path is None or self.owner is None or os.getpid() != self.owner.pid:
            return  # nothing held, or a forked child: the parent's lock is not ours to drop
        _unlink_if_ours(self.path, self.owner)
        self.path = None
        if self.created is not None:
            _remove_empty(self.folder, self.created)


def is_main_rank() -> bool:
    """Whether this process is rank 0 of a launch (or not part of one)."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return rank.strip() == "0"


def acquire(folder: Path | str, *, command: str | None = None, enabled: bool | None = None,
            option: str = "--output-dir") -> FolderLock:
    """Take `folder`'s lock, creating the folder (and parents) if missing. `enabled`:
    whether this process takes it (default: rank 0 of a launch, or a single process); other
    ranks get a no-op lock. `option` names the setting the messages tell the user to change.
    Raises LockedError (held by a live run, or by another host's) or UnwritableFolderError."""
    folder = Path(folder).expanduser()
    if not (is_main_rank() if enabled is None else enabled):
        return FolderLock(folder, None, None)
    created = _make_folder(folder, option)
    path = folder / LOCK_FILE
    me = Owner(_HOST, os.getpid(), _start_token(os.getpid()), _PIDNS, command or _command(),
               _launch(), time.time())
    try:
        atomic.remove_stale(path, ("new", "aside"))  # leftovers of runs killed while locking
        note = _take(path, me, folder, option)
    except BaseException:  # refused, unwritable, Ctrl-C: leave nothing behind
        _unlink_if_ours(path, me)
        if created is not None:
            _remove_empty(folder, created)
        raise
    return FolderLock(folder, path, me, created, note)


@contextlib.contextmanager
def hold(folder: Path | str, *, command: str | None = None, enabled: bool | None = None,
         option: str = "--output-dir") -> Iterator[FolderLock]:
    """`acquire` for the duration of a with-block; released however the block ends (an
    exception, Ctrl-C, SIGTERM turned into KeyboardInterrupt)."""
    lock = acquire(folder, command=command, enabled=enabled, option=option)
    try:
        yield lock
    finally:
        lock.release()


def is_lock_file(name: str) -> bool:
    """Whether a name in a run folder is the lock or one of its transient files (never part
    of what a run wrote)."""
    return name == LOCK_FILE or name.startswith(f".{LOCK_FILE}.")


# ------------------------------------------------------------------------------ taking
def _take(path: Path, me: Owner, folder: Path, option: str) -> str | None:
    """Create the lock file, taking over a stale one. Returns the takeover note, if any."""
    note = None
    for _ in range(_TRIES):
        if _create(path, me, folder, option):
            return note
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # released (or broken by another run) just now: try again
        except OSError as exc:
            raise LockedError(f"{folder} is locked by {path}, which cannot be read "
                              f"({exc.strerror}): if no qorpo run uses this folder, delete "
                              f"{path}; otherwise choose another {option}.") from exc
        reason = _stale_reason(path, raw, folder, option)  # raises while the owner may live
        if _break(path, raw, folder):
            note = reason
    raise LockedError(f"could not take the lock {path}: other runs keep taking it; wait for "
                      f"them or choose another {option}.")


def _create(path: Path, me: Owner, folder: Path, option: str) -> bool:
    """Put our record at `path` unless a lock is there. False when one is."""
    data = json.dumps({**me._asdict(), "time": _when(me.since)}, indent=1).encode()
    try:
        tmp = atomic.temp_file(path, "new")
    except OSError as exc:
        raise _unwritable(folder, exc, option) from exc
    try:
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            raise _unwritable(folder, exc, option) from exc
        try:
            os.link(tmp, path)  # atomic, never replaces: the lock appears whole or not at all
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno in _UNWRITABLE:
                raise _unwritable(folder, exc, option) from exc
        # No hard links here (FAT, some FUSE): exclusive create, then write.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _unwritable(folder, exc, option) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise _unwritable(folder, exc, option) from exc
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _stale_reason(path: Path, raw: bytes, folder: Path, option: str) -> str:
    """Why the lock in `raw` may be taken over; raises LockedError when it may not."""
    owner = _parse(raw)
    if owner is None:
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime >= _UNREADABLE_GRACE_S:
                return f"removed an unreadable lock file {path} (left by a killed run)"
        raise LockedError(f"{folder} is locked by {path}, which cannot be read (a run may be "
                          f"taking it just now): try again; if no qorpo run uses this folder, "
                          f"delete {path}.")
    if owner.host != _HOST or (owner.pidns and _PIDNS and owner.pidns != _PIDNS):
        where = ("another machine" if owner.host != _HOST
                 else f"another container on this machine (PID namespace {owner.pidns})")
        raise LockedError(f"{folder} is in use by a qorpo run on {where} ({owner.describe()}), "
                          "or was until it ended without removing its lock: qorpo cannot check "
                          f"whether it still runs. Wait for it to finish or choose another "
                          f"{option}; if you are sure that run has ended, delete {path} and "
                          "run again.")
    dead = f"took over the lock of a dead run (pid {owner.pid}, started {_when(owner.since)})"
    now = _start_token(owner.pid)
    if not _alive(owner.pid) or now == _EXITED:
        return dead
    if owner.started and now is not None and now != owner.started:
        return f"{dead[:-1]}; its pid now belongs to another process)"
    raise LockedError(f"{folder} is in use by another qorpo run ({owner.describe()}): wait for "
                      f"it to finish or choose another {option}.")


def _break(path: Path, raw: bytes, folder: Path) -> bool:
    """Remove the stale lock `raw` if it is still the one at `path`. Runs of this host that
    break locks take turns (an flock on the folder): while it is held, a lock file that still
    reads `raw` stays so (creators never replace a file, its dead owner never removes it), so
    checking then removing it is safe. Where flock is missing, the lock is moved aside and
    put back if it was not the stale one, which leaves a window of microseconds."""
    with _guard(folder) as guarded:
        if guarded:
            try:
                if path.read_bytes() != raw:
                    return False  # another run took it over first
                path.unlink()
            except FileNotFoundError:
                return False
            return True
        aside = path.with_name(f".{path.name}.aside-{_HOST}-{os.getpid()}-"
                               f"{secrets.token_hex(4)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False  # another run removed it first
        try:
            if aside.read_bytes() == raw:
                return True
            with contextlib.suppress(OSError):  # a fresh lock: put it back (never replacing)
                os.link(aside, path)
            return False
        finally:
            aside.unlink(missing_ok=True)


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[bool]:
    """An exclusive flock on `folder` for the block; yields whether it was taken."""
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        yield _flock(fd)
    finally:
        os.close(fd)  # releases the flock


def _flock(fd: int) -> bool:
    deadline = time.monotonic() + 5.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False  # a stopped process holds it: go on unguarded
            time.sleep(0.01)
        except OSError:
            return False  # not supported on this filesystem


# ------------------------------------------------------------------------------ helpers
def _make_folder(folder: Path, option: str) -> Path | None:
    """Create `folder` and missing parents; return the top-most one created."""
    if folder.is_dir():
        return None
    top = folder
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise UnwritableFolderError(f"{folder} is not a folder (a file is in the way: "
                                    f"{exc.filename or folder}): choose another {option}.") \
            from exc
    except OSError as exc:
        raise UnwritableFolderError(f"cannot create {folder} ({exc.strerror}): choose a "
                                    f"writable {option}.") from exc
    return top


def _unwritable(folder: Path, exc: OSError, option: str) -> UnwritableFolderError:
    fix = ("free some space or choose another" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else "choose a writable")
    return UnwritableFolderError(f"cannot write to {folder} ({exc.strerror or exc}): "
                                 f"{fix} {option}.")


def _unlink_if_ours(path: Path, me: Owner) -> None:
    with contextlib.suppress(OSError):
        if _parse(path.read_bytes()) == me:
            path.unlink()


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove `folder` and its parents up to `top` while they are empty."""
    current = folder
    while True:
        try:
            current.rmdir()
        except OSError:
            return  # not empty (the run wrote something), or gone
        if current == top or current.parent == current:
            return
        current = current.parent


def _parse(raw: bytes) -> Owner | None:
    try:
        d = json.loads(raw)
        owner = Owner(str(d["host"]), int(d["pid"]), d.get("started"), d.get("pidns"),
                      str(d.get("command", "?")), d.get("launch"), float(d.get("since", 0)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return owner if owner.pid > 0 else None


def _start_token(pid: int) -> str | None:
    """This boot's id and the pid's start time (field 22 of /proc/PID/stat, clock ticks since
    boot): the same pid with another token is another process. None where /proc is missing,
    or for a zombie (it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the name in (...) may hold spaces
    if len(fields) < 20:
        return None
    return f"{boot}/{fields[19]}" if fields[0] != "Z" else _EXITED


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_PIDNS = _pidns()


def _launch() -> str | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return shlex.join(argv)[:500]


def _when(since: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))

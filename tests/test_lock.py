"""qorpo.lock: one writer per output folder. Two holders (threads of one process, or real
processes) never share a folder; a lock whose owner was killed (`kill -9`, a recycled pid, a
zombie) is taken over with a note; another host's lock is refused; ranks other than 0 take
nothing; an unwritable folder is one clear error, before any model loads."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qorpo import lock
from qorpo.atomic import _HOST
from qorpo.errors import QorpoError
from qorpo.lock import LOCK_FILE, LockedError, UnwritableFolderError, acquire, hold

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from qorpo.lock import hold
with hold(sys.argv[1], command="qorpo train --fake") as held:
    print("held" if held.path else "no-op", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """Not under a launcher, whatever the environment running the tests says."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def python(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", *args], env=env, text=True,
                            stdout=subprocess.PIPE, **kw)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, **fields) -> bytes:
    """A lock file as another run would have left it."""
    record = {"host": _HOST, "pid": dead_pid(), "started": None, "pidns": None,
              "command": "qorpo train --other", "launch": None, "since": time.time() - 60,
              **fields}
    folder.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(record).encode()
    (folder / LOCK_FILE).write_bytes(raw)
    return raw


def owner_pid(folder: Path) -> int:
    return json.loads((folder / LOCK_FILE).read_text())["pid"]


# ------------------------------------------------------------------------------ one process
def test_second_holder_is_refused_and_release_cleans_up(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with hold(out, command="qorpo train --max-steps 3") as held:
        assert held.created == tmp_path / "a" and held.note is None
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["host"] == _HOST and record["pid"] == os.getpid()
        assert record["command"] == "qorpo train --max-steps 3" and record["started"]
        with pytest.raises(LockedError) as err:
            acquire(out)
        msg = str(err.value)
        assert isinstance(err.value, QorpoError)
        assert msg.startswith(f"{out} is in use by another qorpo run (pid {os.getpid()} on "
                              f"host {_HOST} since 20")
        assert "`qorpo train --max-steps 3`): wait for it to finish or choose another " \
               "--output-dir." in msg
        assert (out / LOCK_FILE).read_text() == json.dumps(record, indent=1)  # untouched
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # no temp files left by the refusal
    assert not (tmp_path / "a").exists()  # created for a run that wrote nothing: removed

    with hold(out) as held:  # a run that wrote something keeps its folder
        (out / "adapter_model.safetensors").write_bytes(b"x")
    assert os.listdir(out) == ["adapter_model.safetensors"]
    with hold(out) as held:  # an existing folder is not "created"
        assert held.created is None
    assert out.is_dir()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_released_when_the_run_fails(tmp_path, exc):
    tmp_path.joinpath("keep").write_text("user's file")
    with pytest.raises(type(exc)):
        with hold(tmp_path):
            raise exc
    assert not (tmp_path / LOCK_FILE).exists()
    assert (tmp_path / "keep").exists()
    with hold(tmp_path) as held:
        assert held.note is None


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path, monkeypatch):
    held = acquire(tmp_path)
    other = write_lock(tmp_path, pid=os.getppid())  # replaced behind our back
    held.release()
    assert (tmp_path / LOCK_FILE).read_bytes() == other
    (tmp_path / LOCK_FILE).unlink()
    held = acquire(tmp_path)
    monkeypatch.setattr(os, "getpid", lambda: 1)  # as in a forked child: not its lock to drop
    held.release()
    monkeypatch.undo()
    assert (tmp_path / LOCK_FILE).exists()
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_works_without_hard_links(tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)  # FAT, some FUSE filesystems
    with hold(tmp_path):
        with pytest.raises(LockedError, match="in use by another qorpo run"):
            acquire(tmp_path)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ processes
def test_another_process_holds_it_until_killed(tmp_path):
    out = tmp_path / "run"
    child = python(HOLDER, str(out), "60")
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(LockedError) as err:
            acquire(out)
        assert f"(pid {child.pid} on host {_HOST} since " in str(err.value)
        assert "`qorpo train --fake`" in str(err.value)
        since = json.loads((out / LOCK_FILE).read_text())["time"]
    finally:
        child.send_signal(signal.SIGKILL)  # no cleanup code of the child runs
        child.wait()
    assert owner_pid(out) == child.pid  # the dead run's lock is still there
    with hold(out) as held:
        assert held.note == f"took over the lock of a dead run (pid {child.pid}, started {since})"
        assert owner_pid(out) == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_a_killed_but_unreaped_owner_is_dead(tmp_path):
    child = python(HOLDER, str(tmp_path), "60")
    try:
        assert child.stdout.readline() == "held\n"
        child.send_signal(signal.SIGKILL)
        stat = Path(f"/proc/{child.pid}/stat")
        for _ in range(500):  # until it is a zombie (its parent, this test, has not reaped it)
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        else:
            pytest.fail("the killed child never became a zombie")
        with hold(tmp_path) as held:
            assert held.note.startswith(f"took over the lock of a dead run (pid {child.pid}")
    finally:
        child.kill()
        child.wait()


def test_a_process_that_ends_normally_releases_it(tmp_path):
    child = python(HOLDER, str(tmp_path / "run"), "0")
    assert child.stdout.read() == "held\n" and child.wait() == 0
    assert not (tmp_path / "run").exists()  # it created the folder and wrote nothing


def test_racing_runs_on_a_stale_lock_one_wins(tmp_path):
    """Six runs start at once on a dead run's lock: exactly one takes it over."""
    write_lock(tmp_path)
    code = """
import sys, time
from pathlib import Path
from qorpo.lock import LockedError, acquire
go = Path(sys.argv[1]) / "go"
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    held = acquire(sys.argv[1])
except LockedError:
    print("lost", flush=True)
else:
    print("won", flush=True)
    time.sleep(1.5)
    held.release()
"""
    children = [python(code, str(tmp_path)) for _ in range(6)]
    try:
        for c in children:
            assert c.stdout.readline() == "ready\n"
        (tmp_path / "go").touch()
        results = sorted(c.communicate(timeout=60)[0].strip() for c in children)
    finally:
        for c in children:
            c.kill()
            c.wait()
    assert results == ["lost"] * 5 + ["won"]
    assert sorted(os.listdir(tmp_path)) == ["go"]  # no aside or temp files left


# ------------------------------------------------------------------------------ stale or not
def test_a_recycled_pid_is_not_the_owner(tmp_path):
    # A live pid (our parent) whose start time is not the one recorded: the owner is gone
    # and the pid was given to another process.
    write_lock(tmp_path, pid=os.getppid(), started="some-boot/12345")
    with hold(tmp_path) as held:
        assert held.note.endswith("; its pid now belongs to another process)")
        assert owner_pid(tmp_path) == os.getpid()


def test_a_live_pid_without_a_start_time_is_the_owner(tmp_path):
    raw = write_lock(tmp_path, pid=os.getppid(), started=None)  # written where /proc is absent
    with pytest.raises(LockedError, match=f"in use by another qorpo run \\(pid {os.getppid()}"):
        acquire(tmp_path)
    assert (tmp_path / LOCK_FILE).read_bytes() == raw


def test_a_dead_pid_is_stale(tmp_path):
    write_lock(tmp_path)
    with hold(tmp_path) as held:
        assert held.note.startswith("took over the lock of a dead run (pid ")


@pytest.mark.parametrize("fields, where", [
    ({"host": "gpu-node-7"}, "on another machine (pid"),
    ({"pidns": "pid:[1]"}, "on another container on this machine (PID namespace pid:[1])"),
])
def test_a_lock_that_cannot_be_checked_is_refused(tmp_path, fields, where):
    raw = write_lock(tmp_path, **fields)  # its pid is dead *here*: that proves nothing
    with pytest.raises(LockedError) as err:
        acquire(tmp_path)
    msg = str(err.value)
    assert where in msg and "cannot check whether it still runs" in msg
    assert f"delete {tmp_path / LOCK_FILE} and run again" in msg
    assert (tmp_path / LOCK_FILE).read_bytes() == raw


def test_an_unreadable_lock_is_refused_until_old(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{trunc")
    with pytest.raises(LockedError, match="which cannot be read"):
        acquire(tmp_path)
    old = time.time() - 60
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with hold(tmp_path) as held:
        assert held.note.startswith("removed an unreadable lock file")


# ------------------------------------------------------------------------------ ranks
def test_other_ranks_share_rank_0s_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with hold(tmp_path / "run") as held:
        assert held.path is None and held.note is None
    assert not (tmp_path / "run").exists()  # rank 1 writes nothing
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with hold(tmp_path / "run") as held:
        assert json.loads(held.path.read_text())["launch"] == "job-42"
        monkeypatch.setenv("RANK", "3")
        with hold(tmp_path / "run") as other:  # a rank of the launch: not refused
            assert other.path is None
        with pytest.raises(LockedError):
            acquire(tmp_path / "run", enabled=True)  # the caller knows better than the env
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with hold(tmp_path / "run") as held:
        assert json.loads(held.path.read_text())["launch"] == "10.0.0.2:29500"


# ------------------------------------------------------------------------------ unwritable
@pytest.mark.parametrize("code, text, fix", [
    (errno.EROFS, "Read-only file system", "choose a writable --output-dir"),
    (errno.EACCES, "Permission denied", "choose a writable --output-dir"),
    (errno.ENOSPC, "No space left on device", "free some space or choose another --output-dir"),
])
def test_an_unwritable_folder_is_one_clear_error(tmp_path, monkeypatch, code, text, fix):
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).startswith(str(out) + os.sep):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(UnwritableFolderError) as err:
        acquire(out)
    assert str(err.value) == f"cannot write to {out} ({text}): {fix}."
    assert os.listdir(out) == []


def test_a_folder_that_cannot_be_created(tmp_path, monkeypatch):
    def refusing_mkdir(path, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", refusing_mkdir)
    with pytest.raises(UnwritableFolderError) as err:
        acquire(tmp_path / "x" / "y")
    assert str(err.value) == (f"cannot create {tmp_path / 'x' / 'y'} (Permission denied): "
                              "choose a writable --output-dir.")
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(UnwritableFolderError, match="is not a folder"):
        acquire(tmp_path / "file" / "run")


def test_a_read_only_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        try:
            (out / "probe").write_text("")
        except PermissionError:
            pass
        else:  # root (CAP_DAC_OVERRIDE) writes anyway; the injected variants above still run
            pytest.skip("permission bits do not stop this user from writing")
        with pytest.raises(UnwritableFolderError, match=f"cannot write to {out} "
                           r"\(Permission denied\)"):
            acquire(out)
        with pytest.raises(UnwritableFolderError, match=r"cannot create .* \(Permission"):
            acquire(out / "sub")
    finally:
        out.chmod(0o755)
    assert os.listdir(out) == []


def test_lock_names(tmp_path):
    assert lock.is_lock_file(LOCK_FILE)
    assert lock.is_lock_file(f".{LOCK_FILE}.new-{_HOST}-12-abc")
    assert not lock.is_lock_file("qorpo_run.json")

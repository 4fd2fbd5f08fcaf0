"""A run's folder: checked before anything is written, locked while a run uses it, replaced safely.

The contract: bad input never touches a folder; two runs never share one; ``--overwrite`` and a failed
``--resume`` never destroy a run.

* `check` makes the read-only checks (a folder, writable, not in use, not already holding a run unless
  ``--overwrite`` or ``--resume``). Every process makes them, and ``bpjax launch`` before it starts any.
* `RunDir` is what the run's leader holds while it trains: a lock on ``WORKDIR/.lock`` (``filelock``:
  an OS lock, released by the kernel when its process dies, so a killed run leaves no stale lock), and,
  for ``--overwrite``, the earlier run moved aside into ``WORKDIR/.replaced-*`` only once the new run has
  passed every check. The earlier run is deleted when the new one has saved its first checkpoint or
  finished, and moved back if the new one fails before that.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import filelock

from bpjax.errors import UserError
from bpjax.metrics import RUN_FILES

LOCK = ".lock"
REPLACED = ".replaced-"
DAMAGED = "damaged-checkpoints"  # unreadable checkpoints a resume skipped, kept for inspection
CHECKPOINTS = "checkpoints"  # the folder inside a run's workdir


def _lock(workdir: Path) -> filelock.BaseFileLock:
    return filelock.FileLock(workdir / LOCK, timeout=0)


def in_use(workdir: Path) -> bool:
    """Whether another process holds ``workdir``'s lock (read-only: an absent lock file is not made)."""
    if not (workdir / LOCK).is_file():
        return False
    lock = _lock(workdir)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False  # cannot even open it: the writability check names the problem
    lock.release()
    return False


def _writable(path: Path, workdir: Path) -> None:
    """``path`` (the workdir or its nearest existing ancestor) must be a folder this process may write."""
    if not path.is_dir():
        raise UserError(f"--workdir {workdir}: {path} is a file, not a folder; choose another --workdir")
    if os.access(path, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    raise UserError(f"--workdir {workdir}: {path} {why}; choose another --workdir")


def check(workdir: str | Path | None, overwrite: bool, resume: bool, probe_lock: bool = True) -> Path | None:
    """Read-only checks of the output folder; returns it as a Path (None: the run writes nothing).

    ``probe_lock``: whether to check that no other run holds the folder's lock. Probing takes the lock
    for an instant, so two processes of one run probing at once would each see the other's probe as a
    run in use: in a multi-process run only process 0 probes (and it alone takes the lock).
    """
    if workdir is None:
        if resume:
            raise UserError("--resume needs the --workdir of the run to continue")
        return None
    workdir = Path(workdir).expanduser()
    if resume and overwrite:
        raise UserError(
            "--resume continues the run in --workdir and --overwrite replaces it; pass one of them"
        )
    existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
    if existing != workdir and not existing.is_dir():
        raise UserError(f"--workdir {workdir}: {existing} is a file, not a folder; choose another --workdir")
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; give a folder")
    _writable(existing, workdir)
    if probe_lock and workdir.exists() and in_use(workdir):
        raise UserError(
            f"--workdir {workdir} is in use by another bpjax run; wait for it to finish, or choose another --workdir"
        )
    if resume:
        if not (workdir / CHECKPOINTS).is_dir():
            raise UserError(
                f"--resume: {workdir} holds no checkpoints; run without --resume (checkpoint.every > 0 saves them)"
            )
        _writable(workdir / CHECKPOINTS, workdir)
        return workdir
    taken = [f for f in (*RUN_FILES, CHECKPOINTS) if (workdir / f).exists()]
    if taken and not overwrite:
        raise UserError(
            f"{workdir} already holds a run ({taken[0]}); choose another --workdir, pass --resume to continue "
            f"it or --overwrite to replace it"
        )
    return workdir


class RunDir:
    """The leader's hold on a run folder from the first write to the end (see the module docstring)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.replaced: Path | None = None
        self._lock: filelock.BaseFileLock | None = None

    def acquire(self) -> None:
        """Create the folder and take its lock; another run that got there first is one line."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            lock = _lock(self.workdir)
            lock.acquire()
        except filelock.Timeout:
            raise UserError(
                f"--workdir {self.workdir} is in use by another bpjax run; wait for it to finish, or choose "
                "another --workdir"
            ) from None
        except OSError as e:
            raise UserError(
                f"--workdir {self.workdir}: {e.strerror or e}; choose another --workdir"
            ) from None
        self._lock = lock

    def move_aside(self) -> None:
        """``--overwrite``: move the earlier run's files into ``.replaced-*`` (a rename, nothing copied)."""
        old = [self.workdir / f for f in (*RUN_FILES, CHECKPOINTS) if (self.workdir / f).exists()]
        if not old:
            return
        self.replaced = self.workdir / f"{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.replaced.mkdir()
        for path in old:
            path.rename(self.replaced / path.name)

    def set_aside_damaged(self, steps: list[int]) -> None:
        """Move unreadable checkpoints a resume skipped out of ``checkpoints/`` (the new run will save
        those steps again), into ``damaged-checkpoints/``, where they stay for inspection."""
        for step in steps:
            src = self.workdir / CHECKPOINTS / str(step)
            if src.exists():
                dest = self.workdir / DAMAGED / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                dest.parent.mkdir(exist_ok=True)
                src.rename(dest)

    def commit(self) -> None:
        """The new run has saved a checkpoint or finished: the earlier run it replaced can go."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def roll_back(self) -> bool:
        """The new run failed before it had anything to show: put the earlier run back. True if it did."""
        if self.replaced is None:
            return False
        for f in (*RUN_FILES, CHECKPOINTS):
            path = self.workdir / f
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        for path in self.replaced.iterdir():
            path.rename(self.workdir / path.name)
        self.replaced.rmdir()
        self.replaced = None
        return True

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def describe_os_error(e: OSError, what: str) -> str:
    """One line for a failed write: the path, the OS's words, and what is still safe."""
    path = e.filename or what
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return f"cannot write {path}: {reason}"

"""Crash-safe files: atomic writes and inter-process locks.

A file written with `atomic_file` is at its path complete or not at all, whatever kills the
writer: it is written to a temp file next to it (the same filesystem, so the final rename
is atomic, unlike a temp file in `$TMPDIR`), flushed to disk, then renamed over the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)
# `<name>.<pid>.<random>.tmp`: unique per writer, so concurrent writers never share one
TEMP_SUFFIX = ".tmp"
_held = threading.local()  # lock files this thread holds (file_lock is re-entrant)
_lock_fds: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader or pool worker): point the inherited descriptors
    of the parent's locks at /dev/null. A flock lives as long as any descriptor of it,
    so a worker outliving a killed parent by seconds would otherwise keep the lock (and
    refuse the rerun); the file objects' later close stays harmless."""
    _held.__dict__.clear()
    if not _lock_fds:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _lock_fds:
        os.dup2(null, fd)
    os.close(null)
    _lock_fds.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def temp_path(path: Path) -> Path:
    """A fresh temp file name in `path`'s directory."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (else a power cut can undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """An open file (mode "wb" or "w") that replaces `path` only once the block finishes;
    if the block raises, the temp file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files that killed writers left in `directory` (call it only while
    holding the lock that keeps other writers out); returns what was removed."""
    stale = sorted(Path(directory).glob(f"*.[0-9]*.*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block,
    waiting (with a log line) while another process holds it. The kernel drops the lock
    when its holder dies, so a killed process never leaves a stale lock. Re-entrant within
    a thread: a nested lock of the same file would otherwise wait for itself."""
    path = Path(path).resolve()
    held = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another process holds it", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:
            unsupported(path, err)
        held.add(path)
        try:
            with _registered(f.fileno()):
                yield
        finally:
            held.discard(path)


@contextmanager
def _registered(fd: int) -> Iterator[None]:
    """Mark `fd` as a held lock (see _drop_inherited_locks) for the block."""
    _lock_fds.add(fd)
    try:
        yield
    finally:
        _lock_fds.discard(fd)


def unsupported(path: Path, err: OSError) -> None:
    """Go on without the lock where the filesystem has no flock (Lustre mounted without
    it, some NFS setups), saying so; re-raise any other error."""
    if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
        raise err
    log.warning("cannot lock %s (%s): going on without the lock", path, err.strerror)


class LockHeld(OSError):
    """`try_lock` found the lock taken; `owner` is what its holder wrote ("pid N on H")."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(f"{path} is held by {owner}")
        self.owner = owner


@contextmanager
def try_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the block, or raise `LockHeld` at
    once if another process (or another `try_lock` in this one) holds it. The holder
    writes "pid N on HOST" into the file for the refusal message; the kernel drops the
    lock when the holder dies, so the file a killed process leaves behind does not block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise LockHeld(path, f.read().strip() or "an unknown process") from None
        except OSError as err:
            unsupported(path, err)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        with _registered(f.fileno()):
            yield

"""One writer per output folder: an advisory lock file that names its holder.

``routelab train``, ``compare`` and ``trace`` write into a folder for minutes to hours and
resume from what is there. Two processes writing into one folder would interleave their
files (a ``metrics.jsonl`` that mixes two seeds, a trace whose shards come from two
models), so each takes ``FolderLock(folder)`` before writing anything into it. The lock
is an ``fcntl.flock`` on ``<folder>/.routelab.lock``: the kernel drops it when its holder
exits, even on SIGKILL, so a crashed run never leaves a stale lock behind (the file may
stay; it is free to take). The file holds the holder's pid, host, command and start time,
which the refused writer prints; a holder that ends normally removes it.

Where ``fcntl`` does not exist (Windows) the lock is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import weakref
from datetime import datetime, timezone
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from routelab.core.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".routelab.lock"


class FolderInUseError(ConfigError):
    """Another process holds the lock of an output folder."""


def holder_description(lock_path: Path) -> str:
    """``pid N on HOST (COMMAND, since TIME)`` from a lock file, or a generic phrase."""
    try:
        info = json.loads(lock_path.read_text())
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class FolderLock:
    """Exclusive, non-blocking lock of ``folder`` for the life of a ``with`` block.

    Creates ``folder`` (and its parents) if needed; when the block ends the lock file is
    removed, and so are the folders it created if they stayed empty, so a command that
    fails its checks leaves nothing behind. Raises ``FolderInUseError`` naming the holder
    when another process has the lock. Take it once per folder, at the top of a command.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "output folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> FolderLock:
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first
        if fcntl is None:  # pragma: no cover
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderInUseError(
                    f"{self.what} {str(self.folder)!r} is in use by {holder_description(self.path)}; wait for it to "
                    f"finish (or stop it), or write somewhere else."
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: take the new one
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python",
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._fd = fd
        self._close_fd = weakref.finalize(self, os.close, fd)  # a lock dropped without release() still ends
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._fd is not None:
            self._remove_if_unused()
            self._fd = None
            self._close_fd()  # closing the descriptor drops the flock

    def _remove_if_unused(self) -> None:
        """Remove the lock file (still holding the lock), then the folders this lock created
        if the command wrote nothing into them."""
        try:
            self.path.unlink()
            for folder in self._created:
                folder.rmdir()
        except OSError:
            pass  # the folder holds the command's output (or another process's lock): keep it

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


F = TypeVar("F", bound=Callable[..., Any])


def holds_folder_lock(folder_of: Callable[..., str | os.PathLike[str]], what: str) -> Callable[[F], F]:
    """Decorate a function that writes into ``folder_of(*args, **kwargs)`` so that it holds
    that folder's ``FolderLock`` while it runs."""

    def decorate(fn: F) -> F:
        @wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with FolderLock(folder_of(*args, **kwargs), what):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate

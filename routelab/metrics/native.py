"""Lazily compiled C kernels (``_replay.c``) loaded with ctypes.

The source is compiled once per machine with the system C compiler (``$CC``, default
``cc``) into ``$ROUTELAB_CACHE_DIR`` (default ``~/.cache/routelab/native``), keyed by a
hash of the source, so a plain ``pip install`` needs no build step. Without a compiler,
or with ``ROUTELAB_NATIVE=0``, callers fall back to the pure-Python kernels in
``routelab.metrics.replay`` (same results, roughly 100x slower) after one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("_replay.c")
CFLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")


def cache_dir() -> Path:
    root = os.environ.get("ROUTELAB_CACHE_DIR")
    if root:
        return Path(root) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "routelab" / "native"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC", "cc")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + "-", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32p = ctypes.POINTER(ctypes.c_int32)
    i64p = ctypes.POINTER(ctypes.c_int64)
    i32, i64 = ctypes.c_int32, ctypes.c_int64
    lib.rl_stack_replay.argtypes = [i32p, i64, i32, i32, i64p, i64, i32, i64, i64p, i64p]
    lib.rl_srp_hist.argtypes = [i32p, i64, i32, i32, i64p, i64, i64, i32, i64p]
    lib.rl_lru_prefetch.argtypes = [i32p, i32, i32p, i32, i32, i64p, i64, i32, i64p, i32p, i32p]
    for fn in (lib.rl_stack_replay, lib.rl_srp_hist, lib.rl_lru_prefetch):
        fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (after one warning) when they cannot be built."""
    if os.environ.get("ROUTELAB_NATIVE", "1") == "0":
        return None
    if sys.platform == "win32":
        warnings.warn("routelab: the C replay kernels are not built on Windows; using the pure-Python kernels.",
                      RuntimeWarning, stacklevel=2)
        return None
    try:
        source = SOURCE.read_bytes()
        key = hashlib.sha256(source + " ".join(CFLAGS).encode() + platform.machine().encode()).hexdigest()[:16]
        target = cache_dir() / f"replay-{key}.so"
        if not target.exists():
            _compile(target)
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"routelab: could not build the C replay kernels ({err}); using the pure-Python kernels, which give "
            "the same results about 100x slower. Install a C compiler (gcc or clang) or set CC to enable them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def pointer(array, ctype):  # noqa: ANN001, ANN201 - tiny ctypes helper
    return array.ctypes.data_as(ctypes.POINTER(ctype))

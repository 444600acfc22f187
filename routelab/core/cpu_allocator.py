"""Keep freed CPU memory in the process, so large tensors do not page-fault on every step.

glibc's ``malloc`` serves every allocation above 32 MiB (and, by its dynamic threshold,
many smaller ones) with a fresh ``mmap`` and returns it with ``munmap`` on free. A CPU
training step allocates the same large buffers again and again (gathered tokens, expert
activations, their gradients), so every step pays a page fault per 4 KiB page written: on
the fine-grained MoE shape that made a token gather 13x slower than the copy itself
(docs/benchmarks.md). PyTorch has a caching allocator on GPUs but none on CPU; turning off
``mmap`` and trimming in glibc gives the same reuse. Peak memory is then kept by the
process (as the CUDA caching allocator keeps it) instead of being handed back.

The ``routelab`` command and the ``bench/`` scripts call ``tune_cpu_allocator()`` at start;
set ``ROUTELAB_CPU_ALLOCATOR=system`` to leave ``malloc`` as it is. Library users call it
themselves (it is process-wide, so routelab never does it on import).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from routelab.core.errors import ConfigError

ENV_VAR = "ROUTELAB_CPU_ALLOCATOR"
ENV_CHOICES = ("tuned", "system")

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc's defaults, restored by tune_cpu_allocator(False).
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_KEEP_UP_TO_BYTES = 2**31 - 1  # the largest trim threshold mallopt accepts (an int)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") else None


def tune_cpu_allocator(enable: bool = True) -> bool:
    """Make glibc keep and reuse freed memory (``enable=True``) or restore its defaults.

    Returns True when the setting was applied, False where the C library is not glibc
    (macOS, musl, Windows), in which case nothing changes.
    """
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_UP_TO_BYTES))
    else:
        settings = (
            (_M_MMAP_MAX, _DEFAULT_MMAP_MAX),
            (_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD),
        )
    accepted = [libc.mallopt(param, value) == 1 for param, value in settings]  # apply every one, then judge
    return all(accepted)


def tune_cpu_allocator_from_env() -> bool:
    """What the command line does at start: tune unless ``ROUTELAB_CPU_ALLOCATOR=system``."""
    choice = os.environ.get(ENV_VAR, "tuned").strip().lower() or "tuned"
    if choice not in ENV_CHOICES:
        raise ConfigError(f"{ENV_VAR}={choice!r} is not one of {ENV_CHOICES}; unset it or use one of those.")
    return choice == "tuned" and tune_cpu_allocator()

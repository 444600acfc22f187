"""Ctrl-C during training: finish the current step, checkpoint, then stop.

The first SIGINT only sets a flag that the training loop checks between steps; a second
one restores the default handler's behaviour (raise ``KeyboardInterrupt`` at once).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRequest:
    def __init__(self) -> None:
        self.requested = False


@contextmanager
def deferred_interrupt() -> Iterator[StopRequest]:
    """Defer Ctrl-C to the next step boundary (a no-op outside the main thread)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):  # noqa: ANN001 - signal handler signature
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)

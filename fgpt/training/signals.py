"""Ctrl-C and SIGTERM during training: finish the step, checkpoint, stop (a second one aborts)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from fgpt.parallel import Strategy


class StopRequest:
    """Set by SIGINT / SIGTERM; the loop asks `anywhere` after each step."""

    def __init__(self):
        self.requested = False

    def anywhere(self, strategy: Strategy) -> bool:
        """Whether any rank was signalled: every rank must take the same checkpoint-and-stop path."""
        return strategy.any_rank(self.requested)


@contextmanager
def stop_requests():
    """A StopRequest that SIGINT / SIGTERM set while the block runs (a second signal raises
    KeyboardInterrupt: abort without a checkpoint). Off the main thread, signals cannot be
    caught, and it is never set."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

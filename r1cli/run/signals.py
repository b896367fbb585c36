"""SIGINT and SIGTERM held back while a few lines run that must not be cut in two (a record's write and its
undo, a fork and the interpreter's own after-fork handlers, where an interrupt is printed as "Exception ignored"
and lost)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM received inside the block act when it ends (Python runs handlers in the main thread only,
    so elsewhere nothing can interrupt the block and nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for n in dict.fromkeys(got):
            handler = previous[n]
            if callable(handler):
                handler(n, None)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(n)

"""A time limit on one wait (an engine's start, a generate call, a weight sync) that ends in a clear message.

In the main thread the limit is a SIGALRM whose handler raises `Timeout` where the
wait is, so the run stops the way any error stops it (one line, non-zero exit). A
wait stuck in C code that never returns to Python cannot be interrupted that way,
so a watchdog thread ends the process with the same message `grace_s` later.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from r1cli.errors import R1Error

TIMEOUT_EXIT = 124  # as timeout(1)


class Timeout(R1Error):
    pass


def _message(what: str, seconds: float, knob: str) -> str:
    return f"timed out after {seconds:g} s waiting for {what} ({knob} sets the limit)"


@contextmanager
def deadline(seconds: float, what: str, knob: str, grace_s: float = 30.0):
    """Raise Timeout if the block runs longer than `seconds` (0: no limit); `what` names the wait, `knob` the
    config key that sets the limit."""
    if not seconds or seconds <= 0:
        yield
        return
    msg = _message(what, seconds, knob)

    def hard_exit():
        print(f"error: {msg}; the wait did not return to Python, ending the process", file=sys.stderr, flush=True)
        os._exit(TIMEOUT_EXIT)

    watchdog = threading.Timer(seconds + grace_s, hard_exit)
    watchdog.daemon = True
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        def on_alarm(signum, frame):
            raise Timeout(msg)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # an enclosing deadline's time left, if any
        started = time.monotonic()
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        if in_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer:  # nested: the enclosing limit keeps running
                signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - started)))

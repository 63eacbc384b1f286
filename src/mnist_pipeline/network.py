"""A deadline for a whole exchange with a server, however the other end trickles.

urllib's and MLflow's timeouts bound each wait for the next bytes, not the exchange: a server that sends its answer
one byte every 0.2 s holds a request open for ever. `time_limit` interrupts the main thread when the deadline
passes, whatever it waits on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class DeadlinePassed(BaseException):
    """Raised in the main thread when a `time_limit` ends. A BaseException, like KeyboardInterrupt: the libraries
    the block calls (MLflow catches every Exception of a request and retries) let it through."""


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise DeadlinePassed(what) in the main thread if the block runs longer than ``seconds``: a wait on a socket
    is interrupted by the signal, however the other end trickles. Nested limits each keep their own end."""
    import signal
    import time

    def expire(signum, frame):
        raise DeadlinePassed(what)

    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:  # the enclosing limit goes on, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001))

"""HTTP requests with a deadline for the whole exchange: connecting, the status line and headers, and the body.

urllib's ``timeout`` bounds each wait for the next bytes, not the exchange: a server that sends its headers one byte
every 0.2 s holds a request open for ever. Here a timer shuts the request's sockets down when the deadline passes,
which ends whatever read is waiting with an error; `deadline` reports whether that is what happened.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired.is_set():
                _cut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired.set()
            for sock in self._sockets:
                _cut(sock)


def _cut(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watched(base: type[http.client.HTTPConnection], deadline: Deadline) -> type[http.client.HTTPConnection]:
    class Connection(base):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    return Connection


@contextmanager
def deadline(seconds: float) -> Iterator[tuple[Callable, Deadline]]:
    """``(urlopen, deadline)``: ``urlopen`` works as urllib's, redirects included, and every connection it opens
    inside the block is cut when ``seconds`` have passed since the block began."""
    limit = Deadline(seconds)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(_watched(http.client.HTTPConnection, limit), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(_watched(http.client.HTTPSConnection, limit), req, context=self._context)

    opener = urllib.request.build_opener(HTTP, HTTPS)
    timer = threading.Timer(seconds, limit.expire)
    timer.daemon = True
    timer.start()
    try:
        yield opener.open, limit
    finally:
        timer.cancel()


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

"""The one exception type a stage turns into a one-line message and a non-zero exit, and how signals stop it."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class PipelineError(Exception):
    """A problem the user can fix (bad param, missing or corrupt file, unreachable mirror).

    The message is a single line that says what went wrong, where, and what to do about it.
    """


def printable(text: str) -> str:
    """``text`` on one line, its control characters escaped (``\\x1b``): a file name holding a terminal's escape
    code or a newline is shown, never acted on by the terminal or read as two lines."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda match: repr(match.group())[1:-1], text)


# Ctrl-C, a scheduler's or torchrun's stop, and a closed terminal or dropped SSH session: each stops a command the
# same way, servers it started included.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GC_THRESHOLD = 100_000  # objects allocated between two collections of the youngest generation (Python: 700)


def run_main(main) -> None:
    """Run a stage's or command's ``main()``; a PipelineError becomes one line on stderr and exit status 1.

    SIGTERM (a scheduler's or torchrun's stop) and SIGHUP (a closed terminal) are handled like Ctrl-C: a
    KeyboardInterrupt unwinds the stack, so that open MLflow runs end KILLED, servers started are stopped, and files
    being written are abandoned before they replace anything. Signals that follow the first are ignored while that
    happens (torchrun relays a Ctrl-C as a second signal); kill -9 still stops everything, and the next run
    recovers from it.
    """
    import _thread
    import gc
    import os
    import sys

    # Start-up and shut-down. Importing torch and MLflow creates about a million objects and almost no garbage,
    # yet Python's cyclic collector walks them again and again as they appear, and once more when the interpreter
    # exits: together a second or more of every command. A high first threshold makes collections rare without
    # turning them off (a long training still frees its cycles); freezing what exists at the end skips the walk
    # at exit.
    gc.set_threshold(GC_THRESHOLD, 20, 20)

    def interrupt(signum, frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def deliver_again_if_lost(unraisable) -> None:
        # A signal that lands while Python runs a finalizer (a __del__, or a weakref callback such as SQLAlchemy's)
        # raises its KeyboardInterrupt there, and Python prints and drops whatever a finalizer raises: the stop
        # would be lost, and with the stop signals ignored from then on, a server command could no longer be
        # stopped. The signal is sent to the main thread again (which wakes it from a blocking wait), from a thread
        # of its own: sent from here, it would be raised in this hook, where it would be dropped too.
        exc = unraisable.exc_value
        if not isinstance(exc, KeyboardInterrupt):
            previous_hook(unraisable)
            return
        sig = getattr(signal, exc.args[0]) if exc.args else signal.SIGINT
        signal.signal(sig, interrupt)
        _thread.start_new_thread(signal.pthread_kill, (threading.main_thread().ident, sig))

    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)
    previous_hook, sys.unraisablehook = sys.unraisablehook, deliver_again_if_lost
    try:
        main()
    except PipelineError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)  # one line, whatever it quotes
        sys.exit(1)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush into the closed pipe at exit
        sys.exit(128 + signal.SIGPIPE)
    except KeyboardInterrupt as exc:
        name = exc.args[0] if exc.args else "SIGINT"
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is interrupted; one says so
            print(f"interrupted ({name})", file=sys.stderr)
        sys.exit(128 + getattr(signal, name))
    finally:
        sys.unraisablehook = previous_hook
        gc.freeze()


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold the stop signals for the length of a block that must not be cut in two; a signal that arrives
    meanwhile is acted on (as KeyboardInterrupt) when the block ends. Outside the main thread: no effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = STOP_SIGNALS
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        handler = previous[received[0]]
        if callable(handler):
            handler(received[0], None)  # run_main's: raises KeyboardInterrupt and ignores what follows
        elif handler == signal.SIG_DFL:
            signal.raise_signal(received[0])  # what it would have done at once

"""The one exception type a stage turns into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix (bad param, missing or corrupt file, unreachable mirror).

    The message is a single line that says what went wrong, where, and what to do about it.
    """


def run_main(main) -> None:
    """Run a stage's or command's ``main()``; a PipelineError becomes one line on stderr and exit status 1.

    SIGTERM (a scheduler's or torchrun's stop) is handled like Ctrl-C: a KeyboardInterrupt unwinds the stack, so
    that open MLflow runs end KILLED and files being written are abandoned before they replace anything. Signals
    that follow the first are ignored while that happens (torchrun relays a Ctrl-C as a second signal); kill -9
    still stops everything, and the next run recovers from it.
    """
    import os
    import signal
    import sys

    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        main()
    except PipelineError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line, whatever it quotes
        sys.exit(1)
    except KeyboardInterrupt as exc:
        name = exc.args[0] if exc.args else "SIGINT"
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is interrupted; one says so
            print(f"interrupted ({name})", file=sys.stderr)
        sys.exit(128 + getattr(signal, name))

"""The one exception type a stage turns into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix (bad param, missing or corrupt file, unreachable mirror).

    The message is a single line that says what went wrong, where, and what to do about it.
    """


def run_main(main) -> None:
    """Run a stage's or command's ``main()``; a PipelineError becomes one line on stderr and exit status 1."""
    import sys

    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

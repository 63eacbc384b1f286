"""The stages' handle on MLflow: a tracking process that runs beside the stage.

Importing MLflow and its SQLite store takes about as long as importing torch (3 s and 2.5 s on a 2-core CPU).
A stage starts its tracking process first thing, so MLflow starts up on another core while the stage imports
torch and reads its data; the stage then sends it each call (open the store, start a run, log an epoch, register
a model) and waits for the answer. The calls are the functions of ``store``, ``runs`` and ``registry`` named in
``CALLS``, with plain JSON arguments and results, one line each way over the child's stdin and stdout.

The tracking process ignores SIGINT and SIGTERM: the stage, interrupted, ends its run as KILLED through it. If the
stage dies without a word (kill -9), the tracking process sees its input close, ends a run left open as KILLED
and exits. A failed call raises ``PipelineError`` here with the child's one-line message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import write_atomic

# What a stage may ask of the tracking process: call name -> the module whose function it is.
CALLS = {
    **dict.fromkeys(["configure"], "store"),
    **dict.fromkeys(["run_status", "mark_killed", "begin_run", "end_run", "log_params", "log_epoch", "log_metrics",
                     "log_artifacts", "logged_epochs"], "runs"),
    **dict.fromkeys(["log_onnx_model", "predict_with_logged_model", "register"], "registry"),
}  # fmt: skip


class Tracker:
    """A running tracking process; use as a context manager (`Tracker.start()`), which closes it at the end."""

    def __init__(self, process: subprocess.Popen):
        self._process = process
        self._next_id = 0
        self.uri: str | None = None  # set by `configure`

    @classmethod
    def start(cls) -> Tracker:
        """Start the tracking process; it begins importing MLflow at once and touches no store until asked."""
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_pipeline.tracker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        return cls(process)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Let the tracking process finish (it ends a run still open as KILLED) and wait for it."""
        if self._process.poll() is None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
        self._process.wait()

    def configure(self) -> str:
        """Open the store (see `store.configure`); an unusable one fails here, before any work."""
        self.uri = self.call("configure")
        return self.uri

    def call(self, name: str, *args: Any) -> Any:
        """Run the function ``name`` of ``CALLS`` in the tracking process and return its result."""
        self._next_id += 1
        request = json.dumps({"id": self._next_id, "call": name, "args": args})
        try:
            self._process.stdin.write(request + "\n")
            self._process.stdin.flush()
        except OSError:
            raise self._died() from None
        while True:
            line = self._process.stdout.readline()
            if not line:
                raise self._died()
            answer = json.loads(line)
            if answer["id"] != self._next_id:
                continue  # the answer to an earlier call that an interruption left unread
            if "error" in answer:
                raise PipelineError(answer["error"])
            return answer["result"]

    def _died(self) -> PipelineError:
        code = self._process.wait()
        return PipelineError(f"the tracking process stopped (exit status {code}); its error is printed above")


@contextmanager
def run(tracker: Tracker, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
        run_id: str | None = None, resume: bool = False) -> Iterator[str]:  # fmt: skip
    """The pipeline's MLflow run for the length of the block: a new one (train stage), or ``run_id`` reopened.

    It ends FINISHED, KILLED when interrupted (Ctrl-C, SIGTERM) or FAILED on an error, so no run stays RUNNING
    after a signal that can be caught. ``resume``: ``run_id`` must exist (the evaluate and export stages).
    """
    run_id = tracker.call("begin_run", dict(params or {}), dict(tags or {}), run_id, resume)
    try:
        yield run_id
    except KeyboardInterrupt:
        _end_quietly(tracker, "KILLED")
        raise
    except BaseException:
        _end_quietly(tracker, "FAILED")
        raise
    tracker.call("end_run", "FINISHED")


def _end_quietly(tracker: Tracker, status: str) -> None:
    try:
        tracker.call("end_run", status)
    except PipelineError:  # the store may be what failed; the error on its way out says what happened
        pass


class EpochLogger:
    """Logs each epoch's metrics into the active run, once. If the store stops answering, training goes on: the
    epochs not logged are noted (``lost``), and a resumed run logs them later with `log` again."""

    def __init__(self, tracker: Tracker, logged: int = 0):
        self.tracker = tracker
        self.logged = logged  # epochs the run already holds
        self.lost: str | None = None  # what went wrong, once the store stopped answering

    def log(self, epoch: int, metrics: Mapping[str, float], log: TextIO | None = None) -> None:
        if self.lost is not None or epoch <= self.logged:
            return
        try:
            self.tracker.call("log_epoch", epoch, {k: float(v) for k, v in metrics.items()})
        except PipelineError as exc:
            self.lost = f"at epoch {epoch}: {str(exc)[:200]}"
            print(f"warning: could not log epoch {epoch} to MLflow; training goes on ({self.lost})",
                  file=log or sys.stderr)  # fmt: skip
            return
        self.logged = epoch


def git_commit() -> str:
    """The commit the code ran from: the experiment's baseline under `dvc exp run`, else HEAD."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(device, threads: int) -> dict[str, str]:
    """The train stage's run tags: the commit, the DVC experiment, and what else determines the digits
    (``environment``) for a training on ``device`` (a torch.device) with ``threads`` CPU threads."""
    from mnist_pipeline import environment

    commit = git_commit()
    tags = {"mlflow.source.git.commit": commit, names.GIT_COMMIT: commit}
    tags.update(environment.tags(device, threads, Path.cwd()))
    if os.environ.get("DVC_EXP_NAME"):
        tags[names.DVC_EXP_NAME] = os.environ["DVC_EXP_NAME"]
        tags["mlflow.runName"] = os.environ["DVC_EXP_NAME"]
    return tags


# --- the run handoff between stages: the train stage writes the run id, evaluate and export read it ----------


def write_run_file(path: Path, run_id: str, tracking_uri: str) -> None:
    write_atomic(path, json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}, indent=2) + "\n")


def read_run_file(path: Path) -> str:
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run the train stage first (`dvc repro train`)") from None
    except (ValueError, KeyError, TypeError):
        raise PipelineError(
            f"{path} is not a run file written by the train stage; rerun `dvc repro -f train`"
        ) from None


# --- the tracking process ----------------------------------------------------------------------------------


def serve() -> None:
    """The tracking process: import MLflow, then answer calls until the stage closes its input."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stage decides how its run ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything MLflow prints goes to stderr, not into answers

    import importlib

    # The slow part, while the stage imports torch. The registry's module is imported on its first call: a stage
    # that never registers does not load it (nor depend on it, in dvc.yaml).
    from mnist_pipeline import runs, store

    store.warm_up()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["call"] not in CALLS:
                raise PipelineError(f"unknown tracking call {request['call']!r}")
            module = importlib.import_module(f"mnist_pipeline.{CALLS[request['call']]}")
            result = getattr(module, request["call"])(*request["args"])
            answer = {"result": result.to_dict() if hasattr(result, "to_dict") else result}
        except PipelineError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the stage shows it as one line
            detail = (str(exc).splitlines() or [""])[0][:300]
            answer = {"error": f"MLflow: {type(exc).__name__}: {detail}"}
        answers.write(json.dumps({"id": request["id"], **answer}) + "\n")
    runs.end_run("KILLED")  # the stage is gone: a run it left open did not finish


if __name__ == "__main__":
    from mnist_pipeline.errors import run_main

    run_main(serve)

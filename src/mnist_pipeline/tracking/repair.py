"""What a killed process leaves half-done in the MLflow store, put right the next time the store is opened.

A stage killed outright (kill -9, power loss, an out-of-memory kill) cannot end its run nor finish what it was
writing. Three things can be left behind, and each is recognised without guessing:

- a run still RUNNING whose owner is gone: every run records its owner (``names.OWNER``: host, PID and the
  process's start time), and a run whose owner on this host no longer exists is ended KILLED;
- a logged model still PENDING whose run is no longer RUNNING: marked FAILED (MLflow marks a model READY once
  all of it is written);
- a registered version that never got its aliases: registration marks a new version with ``names.REGISTERING``
  (its process, as ``names.OWNER``) until it has all its tags, then moves the aliases and sets
  ``names.PROMOTION``, the decision. A version of the pipeline's without a decision whose process is gone (the
  marker's, or its run's) or whose run has ended is one whose registration died: it is deleted. One whose process
  lives, or runs on another machine sharing the tracking server, is left alone (see `registration`).

`store.configure` calls `repair` under the store's lock, so every stage and command that opens the store leaves
it consistent first.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import TextIO

from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from mnist_pipeline import names


def owner() -> str:
    """This process, as a run records it: ``host:pid:start`` (the start time tells a reused PID apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_is_gone(recorded: str) -> bool:
    """True only when the owner ran on this host and its process no longer exists (another host: unknown)."""
    host, _, rest = recorded.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # someone else's process: it exists
    return start not in ("?", _start_time(int(pid)))  # the PID now belongs to another process


def repair(client: MlflowClient, experiment_id: str, log: TextIO | None = None) -> list[str]:
    """Put right what dead processes left in the store; return one line per thing done (also printed)."""
    done = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        recorded = run.data.tags.get(names.OWNER)
        if recorded and owner_is_gone(recorded):
            client.set_terminated(run.info.run_id, "KILLED")
            done.append(f"run {run.info.run_id} was left RUNNING by a process that is gone: ended as KILLED")
    for model in client.search_logged_models([experiment_id], max_results=1000):
        if model.status != LoggedModelStatus.PENDING or not model.source_run_id:
            continue
        if client.get_run(model.source_run_id).info.status != "RUNNING":
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            done.append(f"logged model {model.model_id} of run {model.source_run_id} was never completed: FAILED")
    for version in client.search_model_versions():
        if registration(client, version) == "abandoned":
            client.delete_model_version(version.name, version.version)
            done.append(f"{version.name} version {version.version} was left half-registered: deleted")
    for line in done:
        print(f"repaired the MLflow store: {line}", file=log or sys.stderr)
    return done


def registration(client: MlflowClient, version) -> str:
    """Where a registered version stands: "decided" (it has its aliases and decision), "foreign" (not registered by
    the pipeline), "live" (being registered by a process that lives, or on another machine), "abandoned"."""
    from mlflow.exceptions import MlflowException

    tags = version.tags
    if names.PROMOTION in tags:
        return "decided"
    marked = tags.get(names.REGISTERING)
    if marked is not None:  # "1": marked by a pipeline from before marks named their process
        return "abandoned" if marked == "1" or owner_is_gone(marked) else "live"
    if names.RUN_ID not in tags:
        return "foreign"
    try:
        run = client.get_run(tags[names.RUN_ID])
    except MlflowException:  # its run was deleted
        return "abandoned"
    recorded = run.data.tags.get(names.OWNER)
    gone = run.info.status != "RUNNING" or bool(recorded and owner_is_gone(recorded))
    return "abandoned" if gone else "live"

"""Where the MLflow store is, and opening it.

``MLFLOW_TRACKING_URI`` when set; otherwise an embedded SQLite database ``mlruns/mlflow.db`` with artifacts
beside it in ``mlruns/``, both resolved to absolute paths from the project root. ``dvc exp run --temp/--queue``
runs stages in a copy under ``<root>/.dvc/tmp/exps/``; the root is found from that copy, so those experiments
still log to the user's store rather than into a copy that is deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from mnist_pipeline import names
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import server

T = TypeVar("T")

STORE_DIR = "mlruns"


def project_root(cwd: Path | None = None) -> Path:
    """The user's project root, also from inside a DVC experiment's temporary copy of it."""
    root = Path(os.environ.get("DVC_ROOT") or cwd or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def configure(root: Path | None = None, writes: bool = True) -> str:
    """Point MLflow at the store (see the module docstring), make sure the experiment exists, return the URI.

    ``writes``: whether the caller records anything (runs, versions). A read-only local store (a shared, mounted
    copy) is refused in one line to a caller that writes; one that only reads gets a temporary copy of its database
    whose artifact paths point at the read-only folder.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_pipeline.tracking.repair import repair

    uri = tracking_uri(root)
    chosen = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # before MLflow sets it for the processes it starts
    folder = project_root(root) / STORE_DIR
    if not chosen and _read_only(folder):
        if writes:
            raise PipelineError(
                f"the MLflow store in {folder} is read-only, and this command records runs or models "
                "in it; run it in a writable copy of the project, or set MLFLOW_TRACKING_URI to a "
                "store you can write"
            )
        return _open_read_only(folder)
    if not chosen:
        # The embedded store; the artifacts go beside the database, in mlruns/<experiment name>/.
        folder.mkdir(exist_ok=True)
    _check_sqlite_path(uri)
    server.check(uri)
    # MLflow announces at INFO level that it creates (or upgrades) the tables of a new SQLite store: noise in a
    # pipeline whose store is created on first use as a matter of course. Its warnings and errors still show.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    try:
        with lock(uri):
            if not chosen and (folder / DATABASE).is_file():
                relocate(folder / DATABASE, folder)  # a moved or copied project: its artifacts are here now
            client = MlflowClient()  # the first client of a new SQLite store creates its schema
            found = client.get_experiment_by_name(names.EXPERIMENT)
            if found is None:
                create_experiment(client, names.EXPERIMENT)
            elif EXPERIMENT_KIND[0] not in found.tags:  # made before the tag: filed under GenAI by MLflow's UI
                client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            experiment = mlflow.set_experiment(names.EXPERIMENT)
            repair(client, experiment.experiment_id)  # what killed processes left half-done
    except Exception as exc:  # connection refused, unreadable database, ...
        first_line = (str(exc).splitlines() or [""])[0][:200]
        problem = f"{type(exc).__name__}: {first_line}"
        raise PipelineError(f"cannot use the MLflow store {uri} ({problem}); {_hint(uri, chosen)}") from None
    return uri


DATABASE = "mlflow.db"
# Where MLflow's SQLite store keeps absolute paths into the artifact folder: written when a row is created, they
# name the folder the project was in then.
ARTIFACT_PATH_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


# The kind of experiment MLflow's UI files an experiment under: model training, not GenAI.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def create_experiment(client, name: str) -> str:
    """Create an experiment; in the local store its artifacts go to ``mlruns/<name>/`` beside the database.

    MLflow's own default is ``./mlruns`` of the current folder when the experiment is created: a first command run
    from a subfolder, or a first stage run in a DVC experiment's temporary copy, would put every later artifact
    there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tags = dict([EXPERIMENT_KIND])
    uri = mlflow.get_tracking_uri()
    location = None  # a server decides where artifacts go
    if uri.startswith("sqlite:///"):
        location = str(Path(uri.removeprefix("sqlite:///")).parent / name)
    try:
        return client.create_experiment(name, artifact_location=location, tags=tags)
    except MlflowException as exc:  # another machine created it a moment ago
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
            raise
        return client.get_experiment_by_name(name).experiment_id


def relocate(database: Path, folder: Path) -> None:
    """Point the artifact paths of a store that was moved or copied (``mv``, ``cp -a``) at ``folder``, its
    ``mlruns/`` now.

    MLflow stores each artifact location as an absolute path, so a moved project's champion would not load ("No
    such artifact") and a copy would log its runs into the original's folder. MLflow has no command to move a
    store; the paths are rewritten here, in one transaction, from the old folder to the new one: only those under
    the old ``mlruns/`` folder, which the project's own experiment records.
    """
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(database)) as db, db:
        try:
            row = db.execute("SELECT artifact_location FROM experiments WHERE name = ?", (names.EXPERIMENT,)).fetchone()
        except sqlite3.OperationalError:  # a new, empty database: nothing recorded yet
            return
        if row is None or not row[0] or "://" in row[0]:
            return
        location = Path(row[0])
        old, new = str(location.parent), str(folder)
        # Moved or copied: the experiment's folder came along into this mlruns/ (artifacts MLflow put elsewhere,
        # e.g. under the folder a first command ran in, stay where they are).
        if old == new or location.parent.name != folder.name or not (folder / location.name).is_dir():
            return
        for table, column in ARTIFACT_PATH_COLUMNS:
            try:
                db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 (our names)
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/"),
                )
            except sqlite3.OperationalError:  # a table an older MLflow schema does not have
                continue
    print(
        f"note: this project's MLflow store was moved or copied from {old}; its artifact paths now point to {new}",
        file=sys.stderr,
    )


def _read_only(folder: Path) -> bool:
    database = folder / DATABASE
    return folder.is_dir() and (
        not os.access(folder, os.W_OK) or (database.exists() and not os.access(database, os.W_OK))
    )


def _open_read_only(folder: Path) -> str:
    """Read a read-only store through a temporary copy of its database (SQLite cannot open one whose folder it
    cannot write, and a moved copy's paths must be rewritten); the artifacts are read where they are."""
    import atexit
    import shutil
    import tempfile

    database = folder / DATABASE
    if not database.is_file():
        raise PipelineError(
            f"the MLflow store in {folder} is read-only and holds no database ({DATABASE}): "
            "nothing has been recorded there"
        )
    import mlflow
    from mlflow.tracking import MlflowClient

    _check_sqlite_path(f"sqlite:///{database}")
    copy = Path(tempfile.mkdtemp(prefix="mnist-pipeline-store-")) / DATABASE
    atexit.register(shutil.rmtree, copy.parent, True)
    shutil.copyfile(database, copy)
    relocate(copy, folder)
    uri = f"sqlite:///{copy}"
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    if MlflowClient().get_experiment_by_name(names.EXPERIMENT) is not None:
        mlflow.set_experiment(names.EXPERIMENT)
    print(f"note: the MLflow store in {folder} is read-only: reading it, changing nothing", file=sys.stderr)
    return uri


def _hint(uri: str, chosen: bool) -> str:
    """What to do about a store that cannot be used: the variable that ``chose`` it, or the local file itself."""
    if chosen:
        return "check MLFLOW_TRACKING_URI, or unset it to use the local store in mlruns/"
    path = uri.removeprefix("sqlite:///")
    return (
        f"the local store {path} is damaged or not an MLflow database: restore it from a backup, or move it "
        "aside to start a new one (its runs are then no longer listed)"
    )


def lock(uri: str):
    """Serialise a read-then-write on a local SQLite store between processes.

    Two pipelines starting at once (queued experiments with ``-j 2``, two ``dvc exp run --temp``) would both run
    MLflow's schema migrations on a new store, and one would fail ("duplicate column name"); both would register a
    version, and the one that got the older version could move ``candidate`` last. A file lock beside the database
    makes the second wait until the first is done (a server needs none).
    """
    from contextlib import nullcontext

    from filelock import FileLock

    return FileLock(uri.removeprefix("sqlite:///") + ".lock") if uri.startswith("sqlite:///") else nullcontext()


def _is_sqlite(path: Path) -> bool:
    """Whether the file starts as every SQLite database does (MLflow would take an empty one for a new store and
    write its schema into it, hiding the runs it held)."""
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _check_sqlite_path(uri: str) -> None:
    """Fail at once on an unusable SQLite path; MLflow itself retries for about two minutes."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists() and not path.is_file():
        problem = "is not a file"
    elif path.is_file() and not _is_sqlite(path):
        problem = (
            "is not an SQLite database (empty or damaged): restore it from a backup, or move it away to start "
            "a new store; the runs' artifacts beside it are kept"
        )
    elif not path.exists() and not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
        problem = "cannot be created (its folder is missing or not writable)"
    else:
        return
    raise PipelineError(
        f"MLflow store {uri}: {path} {problem}; "
        + (
            "check MLFLOW_TRACKING_URI"
            if os.environ.get("MLFLOW_TRACKING_URI")
            else "the local store lives in mlruns/ under the project root"
        )
    )


RACE_ATTEMPTS = 3


def despite_insert_races(write: Callable[[], T]) -> T:
    """``write()``, tried again (up to RACE_ATTEMPTS times in all) when a SQL store refused it because another
    writer had just inserted one of its keys: machines logging one new dataset into the experiment, or one study's
    summary on its shared run (the same metric at the same millisecond), at the same moment.

    MLflow's SQL store looks before it inserts, so the next try finds the other's row and links, updates or skips
    it. MLflow retries some of these races itself (a run's tags, a model's version numbers), not these."""
    import random
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            return write()
        except MlflowException as exc:
            if attempt == RACE_ATTEMPTS or not _lost_insert_race(exc):
                raise
            time.sleep(random.uniform(0, 0.1 * attempt))  # let the other writers' transactions end


def _lost_insert_race(exc: Exception) -> bool:
    """MLflow passes the SQL driver's error on: psycopg's ``UniqueViolation``, the ``IntegrityError`` of sqlite3
    and of the MySQL drivers."""
    message = str(exc)
    return "UniqueViolation" in message or "IntegrityError" in message


@contextmanager
def reading() -> Iterator[None]:
    """A command's reads of the store (`exchange`), a server that does not finish answering in time one line."""
    from mnist_pipeline import network

    uri = tracking_uri()
    try:
        with server.exchange(uri):
            yield
    except network.DeadlinePassed:
        raise PipelineError(
            f"the MLflow tracking server {uri} did not answer within {server.deadline_s():g} s "
            "(MLFLOW_HTTP_REQUEST_TIMEOUT, for all of a command's requests); check the server"
        ) from None


def tracking_uri(root: Path | None = None) -> str:
    """The URI `configure` uses, without touching the store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / STORE_DIR / DATABASE}"

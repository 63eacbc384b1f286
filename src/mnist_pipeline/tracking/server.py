"""Talking to an MLflow tracking server: checking that it answers before anything else, bounding a stage's whole
exchange with it in time, and what its failures mean, in one line."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.parse
import urllib.request

from mnist_pipeline import names, network
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import credentials

# MLflow retries an unanswered HTTP request 7 times with a doubling back-off: minutes before an error. A pipeline
# should rather fail fast (or, mid-run, go on training without the server); values the user sets win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PROBE_TIMEOUT_S = 5


def check(uri: str | None = None) -> None:
    """Two quick requests to a tracking server before anything else: its /health, then one read as the user the
    pipeline will log in as. A server that is down, or refuses the credentials, stops the caller in one line.
    ``uri``: by default ``MLFLOW_TRACKING_URI`` (unset: the local store, nothing to check)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    if not is_server(uri):
        return
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if "@" in urllib.parse.urlsplit(uri).netloc:
        raise PipelineError(
            "MLFLOW_TRACKING_URI holds credentials, which would show in logs and messages; put them "
            "in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or in ~/.netrc"
        )
    base = uri.rstrip("/")
    status = _probe(uri, f"{base}/health", {})
    if status is None:  # it answers; now as the user (a read every user may make)
        query = urllib.parse.urlencode({"experiment_name": names.EXPERIMENT})
        status = _probe(uri, f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}", credentials.headers(uri))
    if status in (401, 403):
        raise PipelineError(
            f"the MLflow tracking server {uri} refused {credentials.describe(uri)} ({status}: "
            f"{'no valid login' if status == 401 else 'no permission to read'}); "
            f"{credentials.HOW_TO}"
        )


def _probe(uri: str, url: str, headers: dict[str, str]) -> int | None:
    """GET ``url``: None when it answered (any status but 401 and 403), else that status; a one-line error when the
    server does not answer at all, or not wholly within PROBE_TIMEOUT_S."""
    try:
        with network.time_limit(PROBE_TIMEOUT_S, url):
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=PROBE_TIMEOUT_S) as r:
                r.read(2**16)
        return None
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return exc.code
        return None  # it answers
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
    except network.DeadlinePassed:
        reason = f"no whole answer within {PROBE_TIMEOUT_S} s"
    raise PipelineError(
        f"the MLflow tracking server {uri} does not answer ({reason}); check that it is running and "
        "reachable from here, or unset MLFLOW_TRACKING_URI to use the local store in mlruns/"
    ) from None


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def failure(uri: str, exc: Exception) -> PipelineError:
    """What a tracking server's error in the middle of an exchange means, in one line: a refused login or
    permission, or a server that stopped answering (the half-done run is put right at the next start, `repair`)."""
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else None
    if status == 401:
        return PipelineError(
            f"the MLflow tracking server {uri} refused {credentials.describe(uri)} (401: no valid "
            f"login); {credentials.HOW_TO}"
        )
    if status == 403:
        return PipelineError(
            f"the MLflow tracking server {uri} refused {credentials.describe(uri)} a change (403: "
            "permission denied); ask its admin for write access to the experiment and the "
            "registered model (docs/operations.md)"
        )
    detail = str(exc).rsplit("failed with exception ", 1)[-1].splitlines()[0]
    cause = detail.rsplit("Caused by ", 1)[-1].strip("()") if "Caused by " in detail else detail
    return PipelineError(
        f"the MLflow tracking server {uri} failed in the middle of the exchange ({cause[:160]}); "
        "nothing half-done stays: check the server, then rerun `dvc repro`"
    )


def deadline_s() -> float:
    """How long the exchange with a tracking server may take, all of a stage's requests together: MLflow's own
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (default 120 s), which MLflow applies to each wait for data, not to a whole
    exchange (a server that trickles its answer would hold a stage for ever)."""
    return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 120)


def exchange(uri: str):
    """A context for the whole of a stage's exchange with the store: bounded by `deadline_s` when the store
    is a server (`network.DeadlinePassed` when it ends), unbounded for a local database."""
    from contextlib import nullcontext

    if not is_server(uri):
        return nullcontext()
    return network.time_limit(deadline_s(), f"the MLflow tracking server {uri}")

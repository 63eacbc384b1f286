"""The login the pipeline uses on a tracking server with logins (``mlflow server --app-name basic-auth``).

Nothing of ours stores a credential: MLflow's own client reads ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``), and without them the HTTP library it uses takes the
server's entry in ``~/.netrc`` (or the file ``NETRC`` names). This module finds the same login, in the same order,
for the pipeline's own first request to the server (`server.check`) and to say whose login a server refused.
It never returns or prints a password.
"""

from __future__ import annotations

import base64
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

HOW_TO = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or give the server a `machine` entry in "
    "~/.netrc (never in params.yaml)"
)


def _netrc_login(uri: str) -> tuple[str, str] | None:
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        found = netrc.netrc(path).authenticators(urlsplit(uri).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return (found[0], found[2]) if found else None


def _source(uri: str) -> tuple[str, str | None, str | None]:
    """(where the login comes from, user, password)."""
    env = os.environ
    if env.get("MLFLOW_TRACKING_TOKEN"):
        return "MLFLOW_TRACKING_TOKEN", None, None
    if env.get("MLFLOW_TRACKING_USERNAME") or env.get("MLFLOW_TRACKING_PASSWORD"):
        return "MLFLOW_TRACKING_USERNAME", env.get("MLFLOW_TRACKING_USERNAME", ""), env.get("MLFLOW_TRACKING_PASSWORD")
    login = _netrc_login(uri)
    if login:
        return "netrc", *login
    return "none", None, None


def user(uri: str) -> str | None:
    """The login's user name, which the run records as its user (MLflow takes the OS user's otherwise)."""
    return _source(uri)[1] or None


def headers(uri: str) -> dict[str, str]:
    """The Authorization header MLflow's client would send to ``uri`` (none without a login)."""
    source, user, password = _source(uri)
    if source == "MLFLOW_TRACKING_TOKEN":
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    if source == "none":
        return {}
    token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def describe(uri: str) -> str:
    """Whose login, from where, in words (no secret): for a message."""
    source, user, _ = _source(uri)
    return {
        "MLFLOW_TRACKING_TOKEN": "the token in MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME": f"the login {user!r} (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)",
        "netrc": f"the login {user!r} (from {os.environ.get('NETRC') or '~/.netrc'})",
        "none": "a request without a login",
    }[source]

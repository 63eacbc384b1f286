"""The login the pipeline uses on a tracking server with logins: where it comes from, and the first check."""

from __future__ import annotations

import http.server

import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.tracking import credentials, server
from tests.helpers import serving

URI = "http://tracking.example:5000"


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


def test_the_environment_comes_first_then_the_netrc_and_no_message_shows_the_password(no_login, monkeypatch):
    assert credentials.headers(URI) == {} and credentials.describe(URI) == "a request without a login"
    netrc = no_login / "netrc"
    netrc.write_text("machine tracking.example login bob password netrc-secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert credentials.user(URI) == "bob" and "netrc-secret" not in credentials.describe(URI)
    assert credentials.headers(URI) == {"Authorization": "Basic Ym9iOm5ldHJjLXNlY3JldA=="}  # bob:netrc-secret
    assert credentials.user("http://other.example") is None  # the netrc's entry is for its machine only
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-secret")
    assert credentials.user(URI) == "alice"
    assert credentials.describe(URI) == "the login 'alice' (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"


def test_credentials_in_the_tracking_uri_are_refused_in_one_line(no_login):
    with pytest.raises(PipelineError, match="MLFLOW_TRACKING_URI holds credentials") as refused:
        server.check("http://alice:secret@tracking.example:5000")
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(("status", "said"), [(401, "401: no valid login"), (403, "403: no permission to read")])
def test_a_refused_login_stops_at_the_first_check_naming_the_login(no_login, monkeypatch, status, said):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with serving(Handler) as url, pytest.raises(PipelineError) as refused:
        server.check(url)
    message = str(refused.value)
    assert "refused the login 'alice'" in message and said in message and "wrong" not in message
    assert "\n" not in message

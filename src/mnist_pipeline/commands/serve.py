"""`mnist-pipeline serve`: MLflow's own scoring app (``/invocations``, ``/ping``, ``/health``, ``/version``) for one
model, behind the guards a server reachable by others needs.

- Host check: Starlette's ``TrustedHostMiddleware`` answers 400 to a request whose ``Host:`` header names another
  server (a DNS-rebinding page in a browser cannot reach the model).
- Body limit: ``MAX_BODY_BYTES``; a larger body is refused with 413 before it is read whole.
- Input check against the model's signature, before MLflow parses it: JSON only, ``{"inputs": ...}`` or
  ``{"instances": ...}``, the signature's shape and a number type, finite pixels in [0, 1]; anything else gets 400
  (415 for another content type) with one line that says why and never quotes the input.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np

MAX_BODY_BYTES = 16 * 2**20  # about 2,000 digits as JSON; the worker's memory stays within a few hundred MB
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _reply(status: int, message: str):
    from starlette.responses import JSONResponse

    code = {400: "BAD_REQUEST", 413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}.get(status, "BAD_REQUEST")
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


class InvocationGuard:
    """ASGI middleware in front of MLflow's ``/invocations``: bounded body, inputs checked against the signature."""

    def __init__(self, app, input_shape: tuple[int, ...], max_body_bytes: int = MAX_BODY_BYTES):
        self.app, self.shape, self.max_body_bytes = app, input_shape, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, problem = await self._read_body(scope, receive)
        if problem is None:
            problem = self._check(scope, body)
        if problem is not None:
            return await _reply(*problem)(scope, receive, send)
        sent = False

        async def replay():  # MLflow's app reads the body we already hold
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, scope, receive) -> tuple[bytes, tuple[int, str] | None]:
        too_large = (413, f"the request body is larger than {self.max_body_bytes:,} bytes; send fewer digits at once")
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "the client went away")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return b"", too_large
            if not message.get("more_body"):
                return b"".join(chunks), None

    def _check(self, scope, body: bytes) -> tuple[int, str] | None:
        """None when the body is a batch of digits the model takes, else (status, one line)."""
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != "application/json":
            return 415, 'send JSON (Content-Type: application/json): {"inputs": [[[[...]]]]}'
        expected = 'a JSON object {"inputs": array of shape ' + _shape_text(self.shape) + "}"
        try:
            payload = json.loads(body)  # NaN and Infinity parse, and are refused below
        except RecursionError:
            return 400, "the JSON is nested too deeply; expected " + expected
        except (ValueError, UnicodeDecodeError) as exc:
            where = f" at byte {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
            return 400, f"not valid JSON{where}; expected {expected}"
        keys = set(payload) if isinstance(payload, dict) else set()
        if len(keys & {"inputs", "instances"}) != 1 or not keys <= {"inputs", "instances", "params"}:
            return 400, f"expected {expected}"
        value = payload.get("inputs", payload.get("instances"))
        try:
            array = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            return 400, "the inputs are not a rectangular array of numbers; expected " + expected
        if array.ndim != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, array.shape, strict=True)
        ):
            return 400, f"the inputs have shape {_shape_text(array.shape)}; the model takes {_shape_text(self.shape)}"
        if array.size and not np.isfinite(array).all():
            return 400, "the inputs hold NaN or infinite values; pixels are numbers in [0, 1]"
        if array.size and (array.min() < 0 or array.max() > 1):
            return 400, "the inputs hold values outside [0, 1]; pixels are numbers in [0, 1] (divide 0-255 by 255)"
        return None


def _shape_text(shape) -> str:
    return "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"


def build_app(model_dir: Path, allowed_hosts: list[str], max_body_bytes: int = MAX_BODY_BYTES):
    """MLflow's scoring app for the model in ``model_dir`` (checked by the caller), with the guards above."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    model = mlflow.pyfunc.load_model(str(model_dir))
    (spec,) = model.metadata.get_input_schema().inputs  # the registered model takes one tensor: (N, 1, 28, 28)
    app = scoring_server.init(model)
    app.add_middleware(InvocationGuard, input_shape=tuple(spec.shape), max_body_bytes=max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)  # added last: checked first
    return app


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """The names a request's ``Host:`` header may carry: this machine's loopback names, the address listened on
    (unless it is every address), and those the user adds."""
    listened = [] if host in ("0.0.0.0", "::") else [host]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *listened, *extra]))


# A connection that has not sent a whole request head this long after it opened or after its last response is
# closed (uvicorn's keep-alive timeout, and HeadDeadline below for what it does not cover), and at most this many
# connections and requests are handled at once (more are answered 503 at once: uvicorn's limit_concurrency).
IDLE_TIMEOUT_S = 5
MAX_CONNECTIONS = 64


def head_deadline_protocol():
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's head. uvicorn's keep-alive timeout starts
    only after a response and stops at the first byte received, so a connection that sends nothing, or sends a
    head a byte at a time, would hold its socket for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def _arm(self):
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(IDLE_TIMEOUT_S, self._close_without_head)

        def _close_without_head(self):
            if self.conn.their_state is h11.IDLE:  # no request head complete since the connection or last answer
                self.timeout_keep_alive_handler()

    return HeadDeadline


def serve(model_uri: str, host: str, port: int, allow_pickle: bool, extra_hosts: list[str]) -> None:
    """Download and check the model, then serve it until interrupted."""
    import uvicorn

    from mnist_pipeline.commands.ui import bind
    from mnist_pipeline.tracking import loader, store

    sock = bind(host, port)  # held from here on: the port cannot be taken between this check and the server
    with store.reading():
        model_dir = loader.fetch_model(model_uri, allow_pickle, loader="python_function")
    app = build_app(model_dir, allowed_hosts(host, extra_hosts))
    print(f"serving {model_uri} on http://{host}:{port}/invocations (bodies up to {MAX_BODY_BYTES // 2**20} MiB)",
          file=sys.stderr)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                                           timeout_keep_alive=IDLE_TIMEOUT_S, limit_concurrency=MAX_CONNECTIONS,
                                           http=head_deadline_protocol()))
    # uvicorn stops gracefully on SIGINT and SIGTERM; a closed terminal (SIGHUP) must stop it the same way, and
    # then end the command as run_main ends it for any stop signal.
    hung_up = []

    def hang_up(signum, frame):
        hung_up.append(signum)
        server.handle_exit(signum, frame)

    previous = signal.signal(signal.SIGHUP, hang_up)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGHUP, previous)
    if hung_up:
        signal.raise_signal(signal.SIGHUP)


def main(model_ref: str | None, host: str, port: int, extra_hosts: list[str], allow_pickle: bool) -> None:
    """`mnist-pipeline serve`: the champion unless ``model_ref`` names another model."""
    from mnist_pipeline.commands import ui
    from mnist_pipeline.tracking import loader, store

    store.configure(writes=False)
    model = model_ref or loader.champion()
    ui.warn_if_exposed(host, port, f"the model {model} (anyone can send it requests)")
    serve(model, host, port, allow_pickle, extra_hosts)

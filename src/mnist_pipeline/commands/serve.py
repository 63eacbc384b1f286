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

import asyncio
import json
import signal
import sys
from pathlib import Path

import h11
import numpy as np
from uvicorn.protocols.http.h11_impl import H11Protocol

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
        self.in_flight, self.trim = 0, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        self.in_flight += 1
        if self.trim is not None:
            self.trim.cancel()
        try:
            await self._invocation(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.trim = asyncio.get_running_loop().call_later(IDLE_BEFORE_TRIM_S, _give_back_memory)

    async def _invocation(self, scope, receive, send):
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


# glibc's memory settings (mallopt), and its trim. A request's body, parsed, holds several times its size in
# Python objects and arrays; glibc serves a freed large buffer's successors from its heaps rather than the system
# (its threshold for that rises with each large free) and keeps what is freed there: a flood of large requests left
# the server hundreds of MB larger for good. With the threshold fixed, a buffer of 128 KiB or more is the system's
# and goes back when freed; what small objects leave is trimmed when no request is in flight.
IDLE_BEFORE_TRIM_S = 1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 2**10


def _glibc():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "malloc_trim") else None  # musl and macOS return memory by themselves


def return_large_buffers() -> None:
    """Large buffers straight from the system and back to it when freed (once, at start)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _give_back_memory() -> None:
    """Return what the heaps hold free to the system (a fifth of a second): once no request has been in flight for
    a second, so that a steady stream of requests never waits for it."""
    import gc

    gc.collect()  # a request's cycles (exceptions, frames) would keep pages of small objects alive
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _shape_text(shape) -> str:
    return "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"


def build_app(model_dir: Path, allowed_hosts: list[str], max_body_bytes: int = MAX_BODY_BYTES):
    """MLflow's scoring app for the model in ``model_dir`` (checked by the caller), with the guards above."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    model = mlflow.pyfunc.load_model(str(model_dir))
    _without_memory_arena(model, model_dir)
    (spec,) = model.metadata.get_input_schema().inputs  # the registered model takes one tensor: (N, 1, 28, 28)
    app = scoring_server.init(model)
    app.add_middleware(InvocationGuard, input_shape=tuple(spec.shape), max_body_bytes=max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)  # added last: checked first
    return app


def _without_memory_arena(model, model_dir: Path) -> None:
    """Give MLflow's ONNX model a session without onnxruntime's CPU memory arena, which keeps what its largest
    runs took for good: 16 requests of 700 digits at once left 870 MB held. (MLflow's onnx_session_options has no
    key for it, hence the session is replaced; a model of another kind is left as MLflow loaded it.)"""
    import onnxruntime

    wrapper = getattr(model, "_model_impl", None)
    session = getattr(wrapper, "rt", None)
    onnx_flavor = model.metadata.flavors.get("onnx") or {}
    if not isinstance(session, onnxruntime.InferenceSession) or "data" not in onnx_flavor:
        return
    settings = session.get_session_options()
    settings.enable_cpu_mem_arena = False
    wrapper.rt = onnxruntime.InferenceSession(
        str(model_dir / onnx_flavor["data"]), settings, providers=session.get_providers()
    )


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """The names a request's ``Host:`` header may carry: this machine's loopback names, the address listened on
    (unless it is every address), and those the user adds."""
    listened = [] if host in ("0.0.0.0", "::") else [host]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *listened, *extra]))


# Each connection must send a whole request head within HEAD_TIMEOUT_S of opening or of its last answer, and the
# whole request, body included, within REQUEST_TIMEOUT_S; at most MAX_CONNECTIONS are open at once. When one more
# comes, the connection that has waited longest for its request is closed to make room: connections a client opens
# and holds cannot keep another client's request from an answer. Only when every connection is busy answering is a
# request refused (503, uvicorn's limit_concurrency).
HEAD_TIMEOUT_S = 5
REQUEST_TIMEOUT_S = 20  # 16 MiB at 0.8 MB/s
MAX_CONNECTIONS = 64


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the deadlines and the room-making above. uvicorn's keep-alive timeout
    starts only after a response and stops at the first byte received, so a connection that sends nothing, or its
    head or body a byte at a time, would otherwise hold its socket for ever."""

    deadline = None
    waiting_since = 0.0  # when it began to wait for its next request

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > MAX_CONNECTIONS:
            self._make_room()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        if self.deadline is not None:
            self.deadline.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self.deadline is not None:
            self.deadline.cancel()
        self.waiting_since = self.loop.time()
        self.deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._check, REQUEST_TIMEOUT_S - HEAD_TIMEOUT_S)

    def _check(self, body_time_left: float):
        if self.conn.their_state is h11.IDLE:  # no whole head yet
            self._close()
        elif self.conn.their_state is h11.SEND_BODY:  # a head, not yet its whole body
            if body_time_left > 0:
                self.deadline = self.loop.call_later(body_time_left, self._check, 0)
            else:
                self._close()

    def _close(self):
        if not self.transport.is_closing():
            self.transport.close()
        self.connections.discard(self)

    def _make_room(self):
        waiting = [c for c in self.connections if c is not self and c.conn.their_state in (h11.IDLE, h11.SEND_BODY)]
        if waiting:
            min(waiting, key=lambda c: c.waiting_since)._close()


def serve(model_uri: str, host: str, port: int, allow_pickle: bool, extra_hosts: list[str]) -> None:
    """Download and check the model, then serve it until interrupted."""
    import uvicorn

    from mnist_pipeline.commands.ui import bind
    from mnist_pipeline.tracking import loader, store

    sock = bind(host, port)  # held from here on: the port cannot be taken between this check and the server
    with store.reading():
        model_dir = loader.fetch_model(model_uri, allow_pickle, loader="python_function")
    return_large_buffers()
    app = build_app(model_dir, allowed_hosts(host, extra_hosts))
    print(
        f"serving {model_uri} on http://{host}:{port}/invocations (bodies up to {MAX_BODY_BYTES // 2**20} MiB)",
        file=sys.stderr,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=HEAD_TIMEOUT_S,
            limit_concurrency=MAX_CONNECTIONS + 1,  # one more than the room-making leaves: all busy answering
            http=GuardedProtocol,
        )
    )
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

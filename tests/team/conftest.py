"""The team's servers, real and on 127.0.0.1, each started once for the whole team layer (`pytest -m team`):

- PostgreSQL 15 (the machine's own `initdb` and `pg_ctl`) in a temporary folder, password logins only;
- the team's `mlflow server`: its runs, registry and logins (`--app-name basic-auth`) in that PostgreSQL, the
  artifacts served by the server itself, users made as docs/operations.md makes them;
- an OpenSSH server (`sshd`) on a free port with a throwaway host key, taking one throwaway user key.

Each is started the way docs/operations.md tells a team to start it. Where a program is missing the layer is
skipped, saying which (CI installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port, start_server, stop_server, wait_until_up

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
SSHD = Path("/usr/sbin/sshd")


def _need(program: Path, package: str) -> None:
    if not program.exists():
        pytest.skip(f"{program} is not installed (Debian's {package}): the team layer needs it")


# --- PostgreSQL ------------------------------------------------------------------------------------------------


@dataclass
class Postgres:
    port: int
    user: str = "team"
    password: str = "pg-secret-7f3a"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL MLflow and Optuna take (driver: psycopg 3)."""
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True) as db:  # fmt: skip
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of its own. PostgreSQL refuses to run as root: as root, it runs as the `postgres`
    user the Debian package creates, in a folder of /tmp that user can reach (pytest's own folders are private)."""
    import tempfile

    _need(POSTGRES_BIN / "initdb", "postgresql-15")
    folder = Path(tempfile.mkdtemp(prefix="team-postgres-"))
    server = Postgres(free_port())
    (folder / "password").write_text(server.password)
    as_user = {"user": "postgres"} if os.geteuid() == 0 else {}
    if as_user:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "password", "postgres")
    data = folder / "data"

    def pg(*args: str) -> None:
        done = subprocess.run([str(POSTGRES_BIN / args[0]), *args[1:]], capture_output=True, text=True, **as_user)
        assert done.returncode == 0, done.stdout + done.stderr

    pg("initdb", "-D", str(data), "-U", server.user, "--auth=scram-sha-256", f"--pwfile={folder / 'password'}")
    options = f"-p {server.port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    pg("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "start")
    try:
        yield server
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


# --- the team's MLflow server ----------------------------------------------------------------------------------

WRITERS = ("alice", "bob")  # log runs, register versions, move aliases, repair
READER = "carol"  # reads everything, changes nothing


@dataclass
class TeamServer:
    """The team's `mlflow server`; `kill` and `start` it to play a crash. Passwords: `password(user)`."""

    folder: Path
    backend: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def password(user: str) -> str:
        return f"{user}-Pa55word-{len(user)}x9"

    def env(self, user: str) -> dict[str, str]:
        """What a team member's shell sets to use the server."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": self.password(user)}  # fmt: skip

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend,  # not on the command line: ps shows it
               "MLFLOW_AUTH_CONFIG_PATH": str(self.folder / "basic_auth.ini"),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.password("admin"),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "team-layer-secret-key"}  # fmt: skip
        cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(self.port), "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts"),
               "--workers", "2"]  # fmt: skip
        self.process = start_server(cmd, env=env)
        wait_until_up(self.process, f"{self.url}/health")

    def kill(self) -> None:
        """kill -9 of the server and its workers: no chance to finish anything."""
        import signal

        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


AUTH_CONFIG = """\
[mlflow]
default_permission = READ
database_uri = {auth_database}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Checking a password costs a deliberately slow hash on every request; a minute's cache of good logins makes a
# pipeline's hundreds of requests cheap (a changed password is honoured within that minute).
auth_cache_ttl_seconds = 60
"""


def add_team(server: TeamServer) -> None:
    """The users, as docs/operations.md adds them: a `writers` role with MANAGE on every experiment and registered
    model (EDIT is not enough: a registration removes its own marker tag, and the pipeline deletes what a killed
    process left half-done); anyone else reads (default_permission = READ)."""
    from mlflow.server.auth.client import AuthServiceClient

    previous = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=server.password("admin"))
    try:
        auth = AuthServiceClient(server.url)
        for user in (*WRITERS, READER):
            auth.create_user(user, server.password(user))
        writers = auth.create_role("default", "writers")
        for resource in ("experiment", "registered_model"):
            auth.add_role_permission(writers.id, resource, "*", "MANAGE")
        for user in WRITERS:
            auth.assign_role(user, writers.id)
    finally:
        for key, value in previous.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="session")
def team_server(tmp_path_factory, postgres):
    folder = tmp_path_factory.mktemp("team-server")
    auth_database = postgres.create_database("mlflow_auth")
    (folder / "basic_auth.ini").write_text(AUTH_CONFIG.format(auth_database=auth_database))
    server = TeamServer(folder, postgres.create_database("mlflow"))
    server.start()
    try:
        add_team(server)
        yield server
    finally:
        if server.process.poll() is None:
            stop_server(server.process)


@pytest.fixture
def as_user(team_server, monkeypatch):
    """Use the team server as a user in this process; returns a function of the user name."""

    def use(user: str):
        for key, value in team_server.env(user).items():
            monkeypatch.setenv(key, value)
        import mlflow

        mlflow.set_tracking_uri(team_server.url)
        from mlflow.tracking import MlflowClient

        return MlflowClient()

    yield use
    import mlflow

    mlflow.set_tracking_uri(None)


# --- an SSH server ----------------------------------------------------------------------------------------------


@dataclass
class SshServer:
    port: int
    user: str
    key: Path  # the user's private key
    known_hosts: Path

    def home(self, folder: Path) -> Path:
        """A home folder for a client "machine": ~/.ssh/known_hosts knows the server's throwaway host key."""
        (folder / ".ssh").mkdir(parents=True, exist_ok=True)
        shutil.copy(self.known_hosts, folder / ".ssh" / "known_hosts")
        return folder


SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
AuthorizedKeysFile {folder}/authorized_keys
PidFile {folder}/sshd.pid
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
MaxSessions 50
MaxStartups 50
Subsystem sftp internal-sftp
"""


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory):
    """`sshd` on a free loopback port, for the user running the tests, with a throwaway host key and user key."""
    import getpass

    _need(SSHD, "openssh-server")
    folder = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    port = free_port()
    (folder / "sshd_config").write_text(SSHD_CONFIG.format(port=port, folder=folder))
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder, as its service makes it
    server = start_server([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")])
    try:
        _wait_for_port(server, port)
        yield SshServer(port, getpass.getuser(), folder / "user_key", folder / "known_hosts")
    finally:
        stop_server(server)


def _wait_for_port(server: subprocess.Popen, port: int, limit_s: float = 60) -> None:
    import socket
    import time

    deadline = time.monotonic() + limit_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"port {port} did not open within {limit_s} s"
            time.sleep(0.2)


MACHINES = 6  # processes meeting at once: enough that a race between two writers is lost in a few rounds
ROUNDS = 4  # meetings one after another: a race is lost in one round of several, not in each


def at_once(worker, *args, machines: int = MACHINES) -> None:
    """``worker(*args, barrier)`` in ``machines`` fresh interpreters (spawned: as on other machines, with this
    process's environment), each calling ``barrier.wait()`` just before what they all do at the same moment; returns
    once all have ended, and asserts each ended well."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(machines)
    processes = [context.Process(target=_machine, args=(worker, barrier, *args)) for _ in range(machines)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * machines


def _machine(worker, barrier, *args) -> None:
    try:
        worker(*args, barrier)
    except BaseException:
        barrier.abort()  # the others stop waiting for this one
        raise

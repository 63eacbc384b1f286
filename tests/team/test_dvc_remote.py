"""A DVC remote over SSH (`dvc-ssh`): one machine pushes data, models and an experiment, another clones and
pulls them and has nothing to rerun; a push killed midway and retried leaves the remote whole. The git remote,
which a team keeps on its git host, is a bare repository in a folder."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import git, make_repo, ran_stages, run, user_env

pytestmark = [pytest.mark.team, pytest.mark.e2e]


def remote_objects(store: Path) -> dict[str, Path]:
    """The remote's content-addressed files (``files/md5/ab/cdef...``), by their MD5; not the uploads in flight,
    which go to a hidden temporary name (``.<random>.tmp``) and are renamed once whole."""
    files = (store / "files" / "md5").glob("*/*")
    return {p.parent.name + p.name.split(".")[0]: p for p in files if p.is_file() and not p.name.startswith(".")}


def in_flight(store: Path) -> list[Path]:
    return [p for p in (store / "files" / "md5").glob("*/.*.tmp") if p.is_file()]


def broken(objects: dict[str, Path]) -> list[str]:
    """The objects whose bytes do not hash to their name (size, name)."""
    return [f"{p.stat().st_size} {p.name}" for md5, p in objects.items()
            if hashlib.md5(p.read_bytes()).hexdigest() != md5]  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory, ssh_server, http_mirror, mirror_md5):
    """Machine A: the project with a git remote and a DVC remote on the SSH server, the pipeline run, committed,
    pushed (`git push`, `dvc push`), and an experiment pushed (`dvc exp push`)."""
    server = tmp_path_factory.mktemp("ssh-server")
    subprocess.run(["git", "init", "-q", "--bare", str(server / "project.git")], check=True)
    base = f"ssh://{ssh_server.user}@127.0.0.1:{ssh_server.port}{server}"
    repo = make_repo(tmp_path_factory.mktemp("machine-a"), mirror_md5)
    home = ssh_server.home(repo.parent / "home")
    env = machine_env(home)

    def a(*args: str) -> subprocess.CompletedProcess:
        out = run(repo, http_mirror, *args, **env)
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    a("git", "remote", "add", "origin", str(server / "project.git"))
    a("dvc", "remote", "add", "-d", "team", f"{base}/dvc-store")
    a("dvc", "remote", "modify", "--local", "team", "keyfile", str(ssh_server.key))  # not committed
    a("dvc", "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the pipeline's results, and the team's remotes")
    a("git", "push", "-q", "origin", "HEAD:main")
    a("dvc", "push")
    a("dvc", "exp", "run", "-n", "seed-1", "-S", "train.seed=1")
    a("dvc", "exp", "push", "origin", "seed-1")
    return {"repo": repo, "store": server / "dvc-store", "git": str(server / "project.git"), "env": env}


def machine_env(home: Path) -> dict[str, str]:
    """A machine's user: its own home, whose ~/.ssh/known_hosts knows the SSH server's host key."""
    return {"HOME": str(home)}


def test_another_machine_pulls_data_models_and_experiments_and_has_nothing_to_rerun(shared, tmp_path, ssh_server,
                                                                                    http_mirror):  # fmt: skip
    objects = remote_objects(shared["store"])
    assert objects and not broken(objects)
    home = ssh_server.home(tmp_path / "home")
    env = machine_env(home)
    clone = subprocess.run(["git", "clone", "-q", "--branch", "main", shared["git"], str(tmp_path / "b")],
                           env=user_env(**env), capture_output=True, text=True)  # fmt: skip
    assert clone.returncode == 0, clone.stderr
    repo = tmp_path / "b"

    def b(*args: str) -> subprocess.CompletedProcess:
        out = run(repo, "http://127.0.0.1:9/unused/", *args, **env)  # B never downloads from a mirror
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    b("dvc", "remote", "modify", "--local", "team", "keyfile", str(ssh_server.key))
    b("dvc", "pull")
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["evaluate"]["outs"]
    (onnx,) = [out for out in locked if out["path"] == "models/model.onnx"]
    assert hashlib.md5((repo / "models/model.onnx").read_bytes()).hexdigest() == onnx["md5"]
    assert ran_stages(b("dvc", "repro")) == []  # every output matches dvc.lock: nothing to rerun
    assert "up to date" in b("dvc", "status").stdout

    b("dvc", "exp", "pull", "origin", "seed-1")
    shown = json.loads(b("dvc", "exp", "show", "--json").stdout)
    names = [e.get("name") for commit in shown for e in (commit.get("experiments") or [])]
    assert "seed-1" in names
    b("dvc", "exp", "apply", "seed-1")
    assert ran_stages(b("dvc", "repro")) == []  # the experiment's outputs came with it
    params = (repo / "params.yaml").read_text()
    assert "seed: 1" in params


def test_a_push_killed_midway_and_retried_leaves_the_remote_whole(shared, tmp_path, http_mirror):
    """kill -9 of `dvc push` once part of a new folder of data has reached the remote: the remote holds only whole
    objects (each is uploaded to a temporary name and renamed), `dvc status -c` lists what is missing, and the
    retried push completes it."""
    repo, store, env = shared["repo"], shared["store"], shared["env"]
    folder = repo / "data" / "extra"
    folder.mkdir()
    for i in range(60):  # 60 files of 2 MiB: a push that takes long enough to be caught midway
        (folder / f"part-{i:02}.bin").write_bytes(os.urandom(2 * 2**20))
    added = run(repo, http_mirror, "dvc", "add", "data/extra", **env)
    assert added.returncode == 0, added.stderr
    before = remote_objects(store)
    push = subprocess.Popen(["dvc", "push"], cwd=repo, env=user_env(**env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while len(remote_objects(store)) < len(before) + 5:  # some of the new files are there
        assert push.poll() is None, "the push finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(push.pid, signal.SIGKILL)
    push.wait()
    killed, partial = remote_objects(store), in_flight(store)
    broken_after_kill = broken(killed)
    status = run(repo, http_mirror, "dvc", "status", "-c", **env)
    assert "missing" in status.stdout or "new" in status.stdout, status.stdout
    retried = run(repo, http_mirror, "dvc", "push", **env)
    assert retried.returncode == 0, retried.stderr
    after = remote_objects(store)
    clean = run(repo, http_mirror, "dvc", "status", "-c", **env)
    leftovers = in_flight(store)
    print(
        f"\nremote objects: {len(before)} before, {len(killed)} after the kill -9 (and {len(partial)} partial "
        f"uploads under temporary names), {len(after)} after the retry ({len(leftovers)} temporary files left); "
        f"`dvc status -c`: {clean.stdout.strip()!r}"
    )
    parts = {hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert len(before) < len(killed) < len(after) and parts <= after.keys() and not parts <= killed.keys()
    assert broken_after_kill == [] and broken(after) == []  # no object is ever partial
    assert clean.returncode == 0 and "in sync" in clean.stdout

"""The model registry: the logged model, its registered versions and their aliases, and loading a model back.

The registered model is the ONNX file, logged with MLflow's ``onnx`` flavor: it loads through ``mlflow.pyfunc``
with onnxruntime alone, without pickle, torch or this project, on a machine with or without a GPU. Each new
version becomes ``candidate``; ``champion`` moves to it when it is at least as accurate (see `promotion`).

Several machines may register into one tracking server at once. Their versions get the aliases in the order the
server numbered them, which is the order they were created: a version decides (and moves the aliases) only once
every earlier version has decided, or can no longer (its run ended or its process is gone). The server's own
numbering is the queue; nothing else is shared.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_pipeline import names
from mnist_pipeline.tracking import store


@dataclass(frozen=True)
class Registration:
    name: str
    version: int
    model_uri: str
    aliases: tuple[str, ...]
    champion_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model_uri": self.model_uri,
            "aliases": list(self.aliases),
            "champion_reason": self.champion_reason,
        }


@dataclass(frozen=True)
class Scores:
    """What the promotion rule compares: a version's test accuracy and, where measured, its robust accuracy (the
    robustness report's mean) with the report it was measured on (its distortions, strengths, digits and seed)."""

    test_accuracy: float
    robust_accuracy: float | None = None
    report: str | None = None


@dataclass(frozen=True)
class Rule:
    """When a new version becomes champion: ``export.promote_min_delta`` and ``export.max_robust_drop``."""

    min_delta: float = 0.0
    max_robust_drop: float = 1.0


def _champion(client: MlflowClient, name: str) -> tuple[int, Scores] | None:
    """The current champion's version and scores, or None when there is none."""
    try:
        champion = client.get_model_version_by_alias(name, names.ALIAS_CHAMPION)
    except MlflowException:
        return None
    robust = champion.tags.get(names.ROBUST_ACCURACY)
    scores = Scores(
        float(champion.tags.get(names.TEST_ACCURACY, "nan")),
        robust and float(robust),
        champion.tags.get(names.ROBUST_REPORT),
    )
    return int(champion.version), scores


ONNX_REQUIREMENTS = ("onnx", "onnxruntime")


def log_onnx_model(onnx_path: str | Path, example: np.ndarray, name: str, about: dict[str, str] | None = None):
    """Log the ONNX file as the run's MLflow model ``name``, with signature and input example (a batch of
    digits), its metadata completed with ``about`` (the run, the training); return MLflow's ``ModelInfo``
    (``model_id``, ``model_uri``)."""
    import importlib.metadata

    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    answers = session.run(None, {session.get_inputs()[0].name: example})
    outputs = {output.name: answer for output, answer in zip(session.get_outputs(), answers, strict=True)}
    proto = onnx.load(str(onnx_path))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **(about or {})})
    return mlflow.onnx.log_model(
        proto,
        name=name,
        signature=infer_signature(example, outputs),
        input_example=example,
        # The CPU provider everywhere: the model is small, and a machine with CUDA but onnxruntime's CPU build
        # (the usual install) then loads it exactly as one without.
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,  # one self-contained model.onnx
        pip_requirements=[f"{name}=={importlib.metadata.version(name)}" for name in ONNX_REQUIREMENTS],
    )


def predict_with_logged_model(model_uri: str, digits: np.ndarray) -> list[list[float]]:
    """Logits of the logged model, loaded as users load it (``mlflow.pyfunc``), for ``digits``."""
    import mlflow.pyfunc

    output = mlflow.pyfunc.load_model(model_uri).predict(digits)
    return np.asarray(output["logits"] if isinstance(output, dict) else output).tolist()


def promotion(new: Scores, champion: tuple[int, Scores] | None, rule: Rule) -> tuple[bool, str]:
    """Should a new version with scores ``new`` become champion over ``champion`` (its version and scores)? Returns
    (decision, reason in one line).

    It must be at least as accurate on the test digits (plus ``rule.min_delta``), and, when both have a robust
    accuracy measured on the same report, not more than ``rule.max_robust_drop`` below the champion's there: a point
    gained on MNIST's own test set does not buy a model that reads real digits worse. Means of different reports are
    not compared: the reason says so."""
    if champion is None:
        return True, "no champion yet"
    version, old = champion
    comparable = new.robust_accuracy is not None and old.robust_accuracy is not None and new.report == old.report
    unlike = ""
    if new.robust_accuracy is not None and old.robust_accuracy is not None and not comparable:
        unlike = (
            f"; robust accuracy not compared: champion v{version}'s was measured on another robustness report "
            f"({old.report or 'before reports were named'}; this one: {new.report})"
        )
    tested = f"test accuracy {new.test_accuracy:.4f}"
    if new.test_accuracy < old.test_accuracy + rule.min_delta:
        return False, f"kept champion v{version}: {tested} < its {old.test_accuracy:.4f} + {rule.min_delta:g}{unlike}"
    passed = f"{tested} >= champion v{version}'s {old.test_accuracy:.4f} + {rule.min_delta:g}{unlike}"
    if comparable:
        robust = f"robust accuracy {new.robust_accuracy:.4f}"
        floor = f"its {old.robust_accuracy:.4f} - {rule.max_robust_drop:g}"
        if new.robust_accuracy < old.robust_accuracy - rule.max_robust_drop:
            return False, f"kept champion v{version}: {robust} < {floor} (export.max_robust_drop), though {passed}"
        passed += f"; {robust} >= {floor}"
    return True, passed


def register(
    model_uri: str,
    name: str,
    scores: Scores,
    rule: Rule = Rule(),
    log: TextIO | None = None,
    card: Callable[[str], str] | None = None,
) -> Registration:
    """Register a logged model as a new version of ``name`` and move the aliases.

    ``candidate`` always moves to the new version; ``champion`` moves when `promotion` says so, or when there is
    no champion yet. The decision and its reason are printed and kept as the version's ``promotion`` tag. ``card``
    makes the version's description from its ``models:/`` URI.
    """
    log = log or sys.stderr
    client = MlflowClient()
    card = card or (lambda uri: f"MNIST CNN, test accuracy {100 * scores.test_accuracy:.2f}%: {uri}")
    with store.lock(mlflow.get_tracking_uri()):  # a local store: one writer at a time (a server needs none)
        return _register(client, model_uri, name, scores, rule, log, card)


def _mark_champion_run(client: MlflowClient, name: str, version: int, before: int | None) -> None:
    """The champion's run carries the tag ``champion`` (a column of the runs table), the one before no longer."""
    if before is not None and before != version:
        with suppress(MlflowException):  # its run deleted meanwhile: nothing to unmark
            client.delete_tag(client.get_model_version(name, str(before)).run_id, names.CHAMPION)
    client.set_tag(mlflow.active_run().info.run_id, names.CHAMPION, f"{name} v{version}")


TURN_WAIT_S = 300  # the longest a version waits for earlier ones to decide (a registration takes seconds)
POLL_S = 0.5


def _earlier_undecided(client: MlflowClient, name: str, version: int) -> list[int]:
    """Versions of ``name`` before ``version`` still being registered, by processes that live."""
    from mnist_pipeline.tracking.repair import registration

    earlier = [v for v in client.search_model_versions(f"name = '{name}'") if int(v.version) < version]
    return sorted(int(v.version) for v in earlier if registration(client, v) == "live")


def _wait_for_turn(client: MlflowClient, name: str, version: int, log: TextIO) -> None:
    """Return once every earlier version of ``name`` has decided (see the module's docstring)."""
    import time

    deadline = time.monotonic() + TURN_WAIT_S
    said = False
    while waiting := _earlier_undecided(client, name, version):
        if time.monotonic() > deadline:
            print(
                f"note: {name} version(s) {waiting} registered elsewhere have not decided after {TURN_WAIT_S} s; "
                f"version {version} decides now",
                file=log,
            )
            return
        if not said:
            print(
                f"{name} version {version} waits for version(s) {waiting}, registered at the same time elsewhere, "
                "to move the aliases first",
                file=log,
                flush=True,
            )
            said = True
        time.sleep(POLL_S)


def _new_version(model_uri: str, name: str, tags: dict[str, str]):
    """``mlflow.register_model``, which also tells the logged model its version (the experiment's Models tab shows
    it), without the two lines it prints: the caller prints one that says more."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return mlflow.register_model(model_uri, name, tags=tags)


def _register(
    client: MlflowClient,
    model_uri: str,
    name: str,
    scores: Scores,
    rule: Rule,
    log: TextIO,
    card: Callable[[str], str],
) -> Registration:
    from mnist_pipeline.tracking.repair import owner

    run = mlflow.active_run()
    # Marked with its process until it has all its tags: a registration that dies half-way leaves a version
    # `repair` recognises, and removes once it sees that process gone.
    version = int(_new_version(model_uri, name, tags={names.REGISTERING: owner()}).version)
    print(f"registering {name} version {version}: tags, then aliases", file=log, flush=True)
    try:
        robust = scores.robust_accuracy
        tags = {
            names.TEST_ACCURACY: f"{scores.test_accuracy:.6f}",
            **({names.ROBUST_ACCURACY: f"{robust:.6f}"} if robust is not None else {}),
            **({names.ROBUST_REPORT: scores.report} if scores.report else {}),
            names.RUN_ID: run.info.run_id,
            names.GIT_COMMIT: run.data.tags.get(names.GIT_COMMIT, "unknown"),
            names.DVC_EXP_NAME: run.data.tags.get(names.DVC_EXP_NAME, ""),
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        client.update_model_version(name, str(version), description=card(f"models:/{name}/{version}"))
        client.delete_model_version_tag(name, str(version), names.REGISTERING)  # complete: now it may get aliases
        _wait_for_turn(client, name, version, log)
        champion = _champion(client, name)
        promote, reason = promotion(scores, champion, rule)
        client.set_registered_model_alias(name, names.ALIAS_CANDIDATE, str(version))
        aliases = [names.ALIAS_CANDIDATE]
        if promote:
            client.set_registered_model_alias(name, names.ALIAS_CHAMPION, str(version))
            aliases.append(names.ALIAS_CHAMPION)
            _mark_champion_run(client, name, version, champion and champion[0])
        client.set_model_version_tag(name, str(version), names.PROMOTION, reason)  # decided: the next one's turn
    except BaseException:  # interrupted or failed half-way: no version without its tags and aliases
        with suppress(Exception):
            client.delete_model_version(name, str(version))
        raise
    print(f"registered {name} version {version} ({', '.join(aliases)}): {reason}", file=log)
    return Registration(name, version, f"models:/{name}/{version}", tuple(aliases), reason)

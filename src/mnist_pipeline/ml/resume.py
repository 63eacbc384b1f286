"""Resuming an interrupted training: the loop's whole state after each epoch, saved, checked and restored.

After each epoch the loop hands out its state (``training.train``'s ``on_checkpoint``); ``train(resume=state)``
continues from it. A state is saved whole or not at all, loaded without pickle, and resumed only by the very
training it belongs to (`fingerprint`).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import torch

from mnist_pipeline.config import ModelConfig, TrainConfig
from mnist_pipeline.files import write_atomic


def fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, data_md5: str, code: list[Path]) -> str:
    """What a saved state must match to be resumed: the params that shape training, the data and the ``code``
    files (the train stage's code deps: whatever would rerun the stage makes a saved state useless)."""
    settings = cfg.to_dict()
    digest = hashlib.sha256(json.dumps([model_cfg.to_dict(), settings, data_md5], sort_keys=True).encode())
    for path in sorted(code, key=str):
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()


def save(path, state: dict) -> None:
    """Write a resumable state atomically: a crash while writing leaves the previous one intact."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load(path) -> dict | None:
    """The state saved at ``path`` (weights_only: no pickle), or None when there is none or it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # a torn or foreign file: starting over is the safe answer
        return None


def resumable(path: Path, key: str, wanted: bool) -> dict | None:
    """The state saved at ``path`` when resuming is ``wanted`` and the state belongs to this very training (params,
    data, code: its `fingerprint` is ``key``). Any other state is set aside."""
    state = load(path)
    if state is None:
        return None
    if wanted and state.get("fingerprint") == key:
        return state
    why = "from another training (params, data or code changed)" if wanted else "not resumed (runtime.resume: false)"
    print(f"{path} is {why}: starting over", file=sys.stderr)
    return None

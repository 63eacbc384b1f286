"""What each command loads: the everyday commands start fast because they import only what their work needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_pipeline.ml import export
from mnist_pipeline.ml.model import build
from tests.helpers import tiny_model_config

pytestmark = pytest.mark.e2e  # each test starts a command in a fresh process

# Runs the `mnist-pipeline` command in this process, then prints the top-level packages it loaded.
COMMAND = """
import json, sys
from mnist_pipeline import cli
sys.argv = ["mnist-pipeline", *sys.argv[1:]]
status = 0
try:
    cli.main()
except SystemExit as exit:
    status = exit.code
print(json.dumps({"status": status, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def command(*args: str, env: dict | None = None, cwd: Path | None = None) -> tuple[int, set[str], str]:
    out = subprocess.run([sys.executable, "-c", COMMAND, *args], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=300)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["status"], set(result["loaded"]), out.stdout + out.stderr


def test_predict_with_an_onnx_file_loads_neither_torch_nor_mlflow(tmp_path):
    export.save_onnx(build(tiny_model_config()), torch.rand(2, 1, 28, 28), tmp_path / "m.onnx")
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(tmp_path / "d.png")
    status, loaded, output = command("predict", str(tmp_path / "d.png"), "--model", str(tmp_path / "m.onnx"))
    assert status == 0, output
    assert "d.png\t" in output
    assert "onnxruntime" in loaded and not {"torch", "mlflow"} & loaded


def test_compare_does_not_load_torch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    status, loaded, output = command("compare", env=env, cwd=tmp_path)  # an empty store of its own
    assert status == 0, output
    assert "no runs yet" in output
    assert "mlflow" in loaded and "torch" not in loaded


def test_the_onnx_export_does_not_load_torchs_compiler(tmp_path):
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from mnist_pipeline.ml import export\n"
        "from mnist_pipeline.config import ModelConfig\n"
        "from mnist_pipeline.ml.model import build\n"
        "export.save_onnx(build(ModelConfig(conv_channels=(4,), kernel_size=3, hidden=16, dropout=0.0, "
        "batch_norm=False, input_norm='mnist')), torch.rand(2, 1, 28, 28), Path(sys.argv[1]))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and out.stderr == ""  # and no deprecation notice either
    assert (tmp_path / "m.onnx").stat().st_size > 0

"""A model file whose graph is hostile, built here with onnx's own helpers: one that runs for ever stops on Ctrl-C
and SIGTERM, one that fails at run time or answers what is not a logit per digit is one line, never a traceback
or a digit."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mnist_pipeline.commands import predict
from mnist_pipeline.errors import PipelineError, run_main
from mnist_pipeline.ml import runtime
from tests.helpers import digit

FLOAT = TensorProto.FLOAT


def save_model(path: Path, nodes: list, outputs: list, initializers: list = (), input_shape=("N", 1, 28, 28)) -> Path:
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("x", FLOAT, list(input_shape))],
        outputs,
        initializer=list(initializers),
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def logits_of(x: str = "x", width: int = 10, value: float = 0.0, channels: int = 1) -> tuple[list, list]:
    """Nodes and initializers that turn (N, ``channels``, 28, 28) pixels into (N, ``width``) numbers."""
    features = channels * 784
    weights = helper.make_tensor("w", FLOAT, [features, width], np.full(features * width, value, np.float32))
    nodes = [helper.make_node("Flatten", [x], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    return nodes, [weights]


def endless_model(path: Path) -> Path:
    """An ONNX Loop of 10**12 iterations before the logits."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["v", "one"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", FLOAT, []),
        ],
        initializer=[helper.make_tensor("one", FLOAT, [], [1.0])],
    )
    nodes, initializers = logits_of()
    nodes = [
        helper.make_node("Loop", ["trips", "true", "zero"], ["count"], body=body),
        *nodes[:-1],
        helper.make_node("MatMul", ["flat", "w"], ["product"]),
        helper.make_node("Add", ["product", "count"], ["logits"]),
    ]
    initializers += [
        helper.make_tensor("trips", TensorProto.INT64, [], [10**12]),
        helper.make_tensor("true", TensorProto.BOOL, [], [True]),
        helper.make_tensor("zero", FLOAT, [], [0.0]),
    ]
    return save_model(path, nodes, [helper.make_tensor_value_info("logits", FLOAT, ["N", 10])], initializers)


def run_thread_started() -> threading.Thread:
    """The thread a model's run goes on in, once it has started."""
    while True:
        for thread in threading.enumerate():
            if thread.name.startswith("Thread") and getattr(thread, "_target", None) is runtime._run_into:
                return thread


@pytest.fixture
def stop_handlers():
    """run_main installs its handlers of the stop signals for the process: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_model_that_runs_for_ever_stops_on_ctrl_c_and_sigterm(tmp_path, stop_handlers, stop):
    model = endless_model(tmp_path / "endless.onnx")
    image = tmp_path / "seven.npy"
    np.save(image, digit())
    running = []

    def send_when_running():
        running.append(run_thread_started())
        signal.pthread_kill(threading.main_thread().ident, stop)

    threading.Thread(target=send_when_running, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: predict.main([image], str(model)))
    assert stopped.value.code == 128 + stop
    running[0].join(timeout=60)
    assert not running[0].is_alive(), "the model's run went on after the command stopped"


@pytest.mark.parametrize(
    ("name", "build", "message"),
    [
        (
            "huge-allocation",
            lambda path: save_model(
                path,
                [helper.make_node("ConstantOfShape", ["shape"], ["logits"])],
                [helper.make_tensor_value_info("logits", FLOAT, None)],
                [helper.make_tensor("shape", TensorProto.INT64, [2], [2**40, 2**20])],
            ),
            r"failed on its input \(",
        ),
        (
            "three-channels",
            lambda path: save_model(
                path,
                *(lambda nodes, init: (nodes, [helper.make_tensor_value_info("logits", FLOAT, ["N", 10])], init))(
                    *logits_of(channels=3)
                ),
                input_shape=("N", 3, 28, 28),
            ),
            r"failed on its input \(.*[Ii]nvalid",
        ),
        (
            "three-outputs",
            lambda path: save_model(
                path,
                *(lambda nodes, init: (nodes, [helper.make_tensor_value_info("logits", FLOAT, ["N", 3])], init))(
                    *logits_of(width=3)
                ),
            ),
            r"the model answers \(N, 3\) float32 for N digits; expected \(N, 10\) numbers",
        ),
    ],
)
def test_a_model_that_fails_or_answers_no_digits_is_one_line(tmp_path, files, name, build, message):
    model = build(tmp_path / f"{name}.onnx")
    with pytest.raises(PipelineError, match=message) as refused:
        predict.main([files / "grey.png"], str(model))
    assert "\n" not in str(refused.value)


def test_a_model_that_answers_nan_is_named_for_it_not_for_the_pixels(tmp_path, files, capsys):
    nodes, initializers = logits_of(value=float("nan"))
    model = save_model(
        tmp_path / "nan.onnx", nodes, [helper.make_tensor_value_info("logits", FLOAT, ["N", 10])], initializers
    )
    assert predict.main([files / "grey.png"], str(model)) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {files / 'grey.png'}: the model answered NaN or infinity for it; no digit\n"


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_a_model_whose_weights_name_a_file_outside_its_folder_is_refused(tmp_path, files, location):
    """ONNX keeps large weights in files beside the model: one that names any other file (to read it into the
    model's answers) is refused by onnxruntime's own check, in one line."""
    (tmp_path / "secret.bin").write_bytes(np.arange(7840, dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    weights = TensorProto(name="w", data_type=FLOAT, dims=[784, 10], data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, "offset": "0", "length": str(7840 * 4)}.items():
        weights.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    model = save_model(
        tmp_path / "model" / "m.onnx", nodes, [helper.make_tensor_value_info("logits", FLOAT, ["N", 10])], [weights]
    )
    with pytest.raises(PipelineError, match=r"not an ONNX model \(.*[Ee]xternal data path"):
        predict.main([files / "grey.png"], str(model))

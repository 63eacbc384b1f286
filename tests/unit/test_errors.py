"""How a command ends on a stop signal: as interrupted, wherever in Python the signal lands."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

# A command that stops itself while Python runs a finalizer (a weakref callback of SQLAlchemy's, in the MLflow UI
# command that once never stopped), then blocks as a server command does waiting for its server.
STOPPED_IN_A_FINALIZER = """
import os, signal, sys, threading
from mnist_pipeline.errors import run_main

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.{sig})
        sum(range(10))  # the handler runs here, and what it raises would be dropped

def main():
    Finalized()
    threading.Event().wait()

run_main(main)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_that_lands_in_a_finalizer_still_stops_the_command(sig):
    code = STOPPED_IN_A_FINALIZER.format(sig=sig.name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 128 + sig
    assert out.stderr == f"interrupted ({sig.name})\n"  # nothing of the finalizer's dropped exception

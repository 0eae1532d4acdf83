"""TensorFlow's native start-up notes stay off the terminal of a thyrocad command."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import sys
from thyrocad.logs import quiet_native_imports
quiet_native_imports()
import keras
import tensorflow as tf
assert tf.__spec__.origin.endswith("tensorflow/__init__.py"), tf.__spec__
assert float(keras.ops.sum(keras.ops.ones(3))) == 3.0
print("imported")
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {"KERAS_BACKEND": "tensorflow", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )


def test_the_first_tensorflow_import_writes_nothing_to_stderr() -> None:
    loud = _run(CODE.replace("quiet_native_imports()\n", ""))
    assert loud.returncode == 0, loud.stderr[-2000:]
    if not loud.stderr.strip():
        pytest.skip("this TensorFlow writes nothing to stderr when imported")
    quiet = _run(CODE)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip() == "imported"
    assert quiet.stderr == ""

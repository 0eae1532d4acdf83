"""Where an inference worker runs its model: the CPU, or one pinned GPU.

``thyrocad worker --device gpu:N`` (or ``THYROCAD_WORKER_DEVICE``) goes through
three steps, in this order:

1. :func:`pin_environment`, in the worker command before any Keras backend is
   imported: ``CUDA_VISIBLE_DEVICES=N`` (TensorFlow, JAX and torch then see GPU N
   as their only GPU), ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (JAX's memory
   growth) and ``TF_FORCE_GPU_ALLOW_GROWTH=true``. A CPU worker hides every GPU,
   so that "cpu" in ``/readyz`` and the metrics is true.
2. :func:`probe`, still in the worker command: a fresh interpreter with that
   environment imports the backend and lists its devices, so the command refuses
   to start (:class:`DeviceError`, naming what was found) when ``gpu:N`` is asked
   and the backend sees no GPU. The probe runs in a child process because a
   prefork parent must not import TensorFlow before it forks.
3. :func:`configure`, in the process that predicts, before its first model is
   loaded: TensorFlow's memory growth, and whether the model computes in
   ``mixed_float16`` (GPU only, backends that have it).

On a GPU a worker claims and predicts ``THYROCAD_GPU_BATCH_MAX`` images at once
instead of ``THYROCAD_BATCH_MAX`` (:func:`batch_size`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thyrocad.settings import Settings

logger = logging.getLogger(__name__)

#: Keras backends whose GPU builds run ``mixed_float16``.
MIXED_PRECISION_BACKENDS = ("tensorflow", "jax", "torch")
#: Modules that read the CUDA environment when imported: pinning after them is too late.
BACKEND_MODULES = ("keras", "tensorflow", "jax", "torch")


class DeviceError(RuntimeError):
    """The device asked for cannot be used; the message says what was found instead."""


@dataclass(frozen=True)
class Device:
    """``cpu`` or ``gpu:N`` (N as the machine numbers its GPUs, 0 first)."""

    index: int | None = None  # None: the CPU

    @classmethod
    def parse(cls, text: str) -> Device:
        """``"cpu"`` or ``"gpu:N"`` (case and spaces ignored); DeviceError otherwise."""
        value = text.strip().lower()
        if value == "cpu":
            return cls(None)
        found = re.fullmatch(r"gpu:(\d{1,2})", value)
        if not found:
            raise DeviceError(f"--device {text!r} is not a device: give cpu or gpu:N (0 first)")
        return cls(int(found.group(1)))

    @property
    def is_gpu(self) -> bool:
        return self.index is not None

    @property
    def name(self) -> str:
        return "cpu" if self.index is None else f"gpu:{self.index}"


@dataclass(frozen=True)
class DeviceReport:
    """What a worker runs on, for ``/readyz`` and ``thyrocad_worker_device_info``."""

    device: str
    backend: str
    batch_max: int
    mixed_precision: bool = False
    gpus: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.device,
            "backend": self.backend,
            "batch_max": self.batch_max,
            "mixed_precision": self.mixed_precision,
            "gpus": list(self.gpus),
        }


def batch_size(device: Device, settings: Settings) -> int:
    """Images claimed and predicted at once: the GPU's batch on a GPU, else the CPU's."""
    return settings.gpu_batch_max if device.is_gpu else settings.batch_max


def environment_for(device: Device) -> dict[str, str]:
    """The variables that pin ``device`` for TensorFlow, JAX and torch."""
    if device.is_gpu:
        return {
            "CUDA_VISIBLE_DEVICES": str(device.index),
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        }
    return {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}


def pin_environment(
    device: Device, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set :func:`environment_for` in ``environ`` (``os.environ``) and return it.

    Raises DeviceError when a backend is already imported in this process: it has
    read the CUDA environment, so the pin would not hold.
    """
    if environ is None:
        environ = os.environ
        imported = [name for name in BACKEND_MODULES if name in sys.modules]
        if imported:
            raise DeviceError(
                f"cannot pin {device.name}: {', '.join(imported)} already imported in this "
                "process (the device must be chosen before any Keras backend is imported)"
            )
    pinned = environment_for(device)
    environ.update(pinned)
    return pinned


def backend_name(environ: MutableMapping[str, str] | None = None) -> str:
    """The Keras backend a process started with ``environ`` will use, without importing it.

    As Keras decides: ``KERAS_BACKEND``, else ``backend`` in ``$KERAS_HOME/keras.json``
    (``~/.keras/keras.json``), else TensorFlow.
    """
    env = os.environ if environ is None else environ
    if env.get("KERAS_BACKEND"):
        return env["KERAS_BACKEND"]
    home = Path(env.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        configured = json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        configured = None
    return str(configured or "tensorflow")


# Run by probe() in a fresh interpreter: import the backend, list its devices, print JSON.
_PROBE = r"""
import json, sys
import keras
backend = keras.backend.backend()
devices, gpus = [], []
if backend == "tensorflow":
    import tensorflow as tf
    devices = [d.name for d in tf.config.list_physical_devices()]
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
elif backend == "jax":
    import jax
    devices = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()]
    gpus = [d for d, j in zip(devices, jax.devices()) if j.platform == "gpu"]
elif backend == "torch":
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n)]
    devices = ["cpu", *gpus]
else:
    devices = [backend]
found = {"backend": backend, "devices": devices, "gpus": gpus}
sys.stdout.write("\nTHYROCAD-PROBE " + json.dumps(found) + "\n")
"""


def probe(
    device: Device,
    settings: Settings,
    environ: MutableMapping[str, str] | None = None,
    timeout: float = 300.0,
    asked: str = "",
) -> DeviceReport:
    """Check, in a fresh interpreter with ``environ``, that the backend can use ``device``.

    Returns the report of a usable device; raises DeviceError when ``gpu:N`` was asked
    and the backend sees no GPU (naming the devices it does see), or when the backend
    cannot even be imported. ``asked`` says where the device came from in that message
    (default ``THYROCAD_WORKER_DEVICE=gpu:N``).
    """
    env = dict(os.environ if environ is None else environ)
    if not device.is_gpu:
        return DeviceReport("cpu", backend_name(env), batch_size(device, settings))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(
            f"{device.name}: the {backend_name(env)} backend did not list its devices within "
            f"{timeout:.0f} s"
        ) from exc
    found = _probe_result(done.stdout)
    if done.returncode != 0 or found is None:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise DeviceError(
            f"{device.name}: the Keras backend {backend_name(env)!r} could not be imported to "
            f"list its devices: {last}"
        )
    backend = str(found["backend"])
    gpus = tuple(str(g) for g in found["gpus"])
    if not gpus:
        seen = ", ".join(str(d) for d in found["devices"]) or "no device at all"
        raise DeviceError(
            f"{asked or 'THYROCAD_WORKER_DEVICE=' + device.name} asks for GPU {device.index}, but "
            f"the {backend} backend sees no GPU with CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES', '')}: it found {seen}. Check that the GPU "
            f"exists (nvidia-smi -L) and that a CUDA build of {backend} is installed, or "
            "run the worker with --device cpu"
        )
    mixed = settings.mixed_precision and backend in MIXED_PRECISION_BACKENDS
    return DeviceReport(device.name, backend, batch_size(device, settings), mixed, gpus)


def _probe_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("THYROCAD-PROBE "):
            try:
                value = json.loads(line.removeprefix("THYROCAD-PROBE "))
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def configure(device: Device, settings: Settings) -> DeviceReport:
    """Prepare this process's backend for ``device``; call before the first model loads.

    Imports Keras. On a GPU: TensorFlow's memory growth on every visible GPU, and the
    report says whether models compute in ``mixed_float16``. Raises DeviceError when
    ``gpu:N`` was asked and the backend sees no GPU (the command's probe refuses that
    earlier; this guards a process started some other way).
    """
    import keras

    backend = keras.backend.backend()
    if not device.is_gpu:
        return DeviceReport("cpu", backend, batch_size(device, settings))
    gpus: tuple[str, ...]
    if backend == "tensorflow":
        import tensorflow as tf

        physical = tf.config.list_physical_devices("GPU")
        for gpu in physical:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised: TF_FORCE_GPU_ALLOW_GROWTH held
                logger.warning("memory growth not set on %s: already initialised", gpu.name)
        gpus = tuple(gpu.name for gpu in physical)
    elif backend == "jax":
        import jax

        gpus = tuple(f"gpu:{d.id} {d.device_kind}" for d in jax.devices() if d.platform == "gpu")
    elif backend == "torch":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = tuple(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
    else:
        gpus = ()
    if not gpus:
        raise DeviceError(
            f"{device.name} asked, but the {backend} backend of this process sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')})"
        )
    mixed = settings.mixed_precision and backend in MIXED_PRECISION_BACKENDS
    report = DeviceReport(device.name, backend, batch_size(device, settings), mixed, gpus)
    logger.info(
        "worker device ready",
        extra={"device": report.device, "backend": backend, "mixed_precision": mixed},
    )
    return report

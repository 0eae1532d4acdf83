"""The worker's device: parsing, pinning, the refusal without a GPU, batch size,
mixed precision on a float32 model, /readyz and the metric.

No GPU exists on the project's machines: what needs one (memory growth on a real
GPU, float16 speed) is ``bench/gpu_check.sh``'s; here the CPU side of every path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from thyrocad import metrics
from thyrocad.health import HealthServer, Readiness
from thyrocad.settings import Settings, load_settings
from thyrocad.worker.device import (
    Device,
    DeviceError,
    DeviceReport,
    backend_name,
    batch_size,
    environment_for,
    pin_environment,
    probe,
)

REPO = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(data_dir=tmp_path / "data", metrics_port=0, **overrides)


def _jax_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THYROCAD_")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("JAX_PLATFORMS", None)
    env.update(KERAS_BACKEND="jax", **extra)
    return env


@pytest.mark.parametrize(
    ("text", "name", "index"),
    [("cpu", "cpu", None), (" CPU ", "cpu", None), ("gpu:0", "gpu:0", 0), ("GPU:12", "gpu:12", 12)],
)
def test_device_parses(text: str, name: str, index: int | None) -> None:
    device = Device.parse(text)
    assert (device.name, device.index, device.is_gpu) == (name, index, index is not None)


@pytest.mark.parametrize("text", ["gpu", "gpu:", "gpu:-1", "cuda:0", "gpu:0,1", "tpu:0", ""])
def test_device_refuses_other_spellings(text: str) -> None:
    with pytest.raises(DeviceError, match="give cpu or gpu:N"):
        Device.parse(text)


def test_environment_pins_one_gpu_or_hides_them() -> None:
    assert environment_for(Device(3)) == {
        "CUDA_VISIBLE_DEVICES": "3",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }
    assert environment_for(Device()) == {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    pin_environment(Device(2), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"


def test_pinning_holds_in_a_fresh_process_and_refuses_after_a_backend_import() -> None:
    code = textwrap.dedent(
        """
        import json, os, sys
        from thyrocad.worker.device import Device, DeviceError, pin_environment
        pin_environment(Device.parse("gpu:1"))
        import jax  # the backend reads the pinned environment
        seen = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",
                                           "XLA_PYTHON_CLIENT_PREALLOCATE")}
        try:
            pin_environment(Device.parse("gpu:0"))
            late = "pinned"
        except DeviceError as exc:
            late = str(exc)
        print(json.dumps({"env": seen, "late": late, "platform": jax.devices()[0].platform}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_jax_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["env"] == {"CUDA_VISIBLE_DEVICES": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert "already imported" in found["late"] and "jax" in found["late"]
    assert found["platform"] == "cpu"  # this machine has none: what probe() refuses


def test_probe_refuses_a_gpu_the_backend_does_not_see(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    env = _jax_env(**environment_for(Device(0)))
    with pytest.raises(DeviceError) as caught:
        probe(Device(0), s, env, timeout=120)
    message = str(caught.value)
    assert "THYROCAD_WORKER_DEVICE=gpu:0 asks for GPU 0" in message
    assert "the jax backend sees no GPU" in message
    assert "it found cpu:0" in message and "CUDA_VISIBLE_DEVICES=0" in message


def test_probe_of_the_cpu_imports_nothing(tmp_path: Path) -> None:
    report = probe(Device(), _settings(tmp_path, batch_max=16), {"KERAS_BACKEND": "torch"})
    assert report == DeviceReport("cpu", "torch", 16, False, ())


def test_worker_command_refuses_to_start_without_the_gpu(tmp_path: Path) -> None:
    env = _jax_env(THYROCAD_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run(
        [sys.executable, "-m", "thyrocad", "worker", "--device", "gpu:0", "--pool", "solo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: --device gpu:0 asks for GPU 0" in done.stderr
    assert "sees no GPU" in done.stderr and "Traceback" not in done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "thyrocad", "worker", "--device", "cuda:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 1 and "error: --device 'cuda:0' is not a device" in bad.stderr


def test_backend_name_reads_keras_json(tmp_path: Path) -> None:
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    assert backend_name({"KERAS_HOME": str(tmp_path)}) == "jax"
    assert backend_name({"KERAS_HOME": str(tmp_path), "KERAS_BACKEND": "torch"}) == "torch"
    assert backend_name({"KERAS_HOME": str(tmp_path / "none")}) == "tensorflow"


def test_batch_size_follows_the_device(tmp_path: Path) -> None:
    from thyrocad.worker.context import WorkerContext

    s = _settings(tmp_path, batch_max=24, gpu_batch_max=96)
    assert batch_size(Device(), s) == 24 and batch_size(Device(1), s) == 96
    gpu = WorkerContext.from_settings(s.model_copy(update={"worker_device": "gpu:1"}))
    cpu = WorkerContext.from_settings(s)
    assert (gpu.device.name, gpu.settings.batch_max, gpu.models.device) == ("gpu:1", 96, Device(1))
    assert (cpu.device.name, cpu.settings.batch_max) == ("cpu", 24)
    assert s.batch_max == 24  # the caller's settings are not changed
    gpu.engine.dispose()
    cpu.engine.dispose()


def test_a_float32_model_loads_and_predicts_in_mixed_precision(tmp_path: Path) -> None:
    import keras

    from thyrocad.db.records import ModelVersionRecord
    from thyrocad.models.architectures import build_model
    from thyrocad.models.registry import Registry
    from thyrocad.worker.model_holder import load_version

    keras.utils.set_random_seed(3)
    model = build_model("vgg19", input_size=32, weights=None)
    saved = Registry(tmp_path / "models").save(
        model, {"architecture": "vgg19", "classes": ["autoimmune", "normal"], "input_size": 32}
    )
    active = ModelVersionRecord(
        saved.version, "vgg19", ("autoimmune", "normal"), 32, str(saved.path)
    )
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    plain = load_version(active)
    reference = plain.predict(images)
    assert plain.precision == "float32"
    report = DeviceReport("gpu:0", keras.backend.backend(), 2, mixed_precision=True, gpus=("g",))
    mixed = load_version(active, report)
    assert (mixed.precision, mixed.max_batch) == ("mixed_float16", 2)
    layers = {layer.name: layer.dtype_policy.name for layer in mixed.model._flatten_layers()}
    assert layers["predictions"] == "float32"  # the softmax stays float32
    assert layers["block1_conv1"] == layers["fc"] == "mixed_float16"
    assert mixed.model.get_layer("vgg19").get_layer("block1_conv1").kernel.dtype == "float32"
    probabilities = mixed.predict(images)  # 3 batches of at most 2
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, reference, atol=2e-2)
    # float16 really ran: not bit-identical to float32
    assert not np.array_equal(probabilities, reference)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_readyz_names_the_device(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    report = DeviceReport("gpu:0", "jax", 128, True, ("gpu:0 NVIDIA H200",))
    readiness = Readiness(s, "inference", device=report)
    server = HealthServer("127.0.0.1", 0, metrics.scrape_registry(), readiness).start()
    plain = HealthServer("127.0.0.1", 0, metrics.scrape_registry(), Readiness(s, "beat")).start()
    try:
        _, body = _get(f"http://127.0.0.1:{server.port}/readyz")
        _, beat = _get(f"http://127.0.0.1:{plain.port}/readyz")
    finally:
        server.stop()
        plain.stop()
    assert json.loads(body)["device"] == {
        "name": "gpu:0",
        "backend": "jax",
        "batch_max": 128,
        "mixed_precision": True,
        "gpus": ["gpu:0 NVIDIA H200"],
    }
    assert "device" not in json.loads(beat)


def test_device_metric_is_labelled() -> None:
    metrics.worker_device("gpu:3", "jax")
    text = generate_latest(metrics.scrape_registry()).decode()
    assert 'thyrocad_worker_device_info{backend="jax",device="gpu:3"} 1.0' in text
    assert "thyrocad_worker_device_info" in metrics.exported_names()

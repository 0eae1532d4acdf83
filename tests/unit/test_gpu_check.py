"""bench/gpu_check.sh says "no GPU" and exits 0 where there is none, and its timing code
runs on the CPU with --force-cpu (no timing is asserted, only that every ratio is printed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
HELPER = ROOT / "bench" / "gpu_check.py"
REAL_GPU = shutil.which("nvidia-smi") is not None


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS")
    }
    env.update(PYTHON=sys.executable, **extra)
    return env


def _run(
    command: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_without_nvidia_smi_it_says_no_gpu_and_exits_0(tmp_path: Path) -> None:
    path = os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()
    )
    done = _run(["bash", str(SCRIPT)], _env(PATH=path))
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == "no GPU: nvidia-smi is not installed (no NVIDIA driver on this machine)"
    )


@pytest.mark.skipif(REAL_GPU, reason="a real GPU is here: bench/gpu_check.sh would time it")
def test_a_gpu_no_backend_sees_is_no_gpu(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: Imaginary GPU (UUID: GPU-0)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    done = _run(["bash", str(SCRIPT)], _env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}"))
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("no GPU: nvidia-smi lists GPU 0 but no Keras backend sees it (jax ")
    missing = _run(
        ["bash", str(SCRIPT), "--gpu", "3"], _env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    )
    assert missing.returncode == 0
    assert missing.stdout.startswith("no GPU: nvidia-smi -L lists no GPU 3")


@pytest.mark.skipif(REAL_GPU, reason="a real GPU is here")
def test_helper_says_no_gpu_when_the_backend_sees_none() -> None:
    done = _run([sys.executable, str(HELPER)], _env(KERAS_BACKEND="jax"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        done.stdout.strip().splitlines()[-1].startswith("no GPU: the jax backend sees only cpu:0")
    )


@pytest.mark.slow
def test_force_cpu_prints_every_ratio() -> None:
    done = _run(
        [
            sys.executable,
            str(HELPER),
            "--force-cpu",
            *("--input-size", "32", "--batch", "4", "--cpu-batch", "2"),
            *("--repeats", "2", "--cpu-repeats", "1"),
        ],
        _env(KERAS_BACKEND="jax"),
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "gpu_check: Keras backend jax, accelerator cpu (forced), VGG-19 at 32 px"
    ratios = {}
    for line in lines:
        found = re.fullmatch(r"ratio (.+): (\d+\.\d\d) x", line)
        if found:
            ratios[found.group(1)] = float(found.group(2))
    assert set(ratios) == {
        "compiled cpu:0 / cpu, batch 2",
        "worker path / compiled call, float32, batch 4",
        "worker path / compiled call, mixed_float16, batch 4",
        "mixed_float16 / float32 on cpu:0, batch 4",
    }, done.stdout
    assert all(value > 0 for value in ratios.values())
    assert any(line.startswith("machine: ") for line in lines)
    assert any(
        re.search(r"float32 \d+\.\d img/s, mixed_float16 \d+\.\d img/s", line) for line in lines
    )

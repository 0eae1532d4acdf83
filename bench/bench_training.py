"""Benchmark: the paper's VGG-19 recipe with cached features vs the same epochs uncached.

Runs ``models.training.train`` twice on synthetic grey images with random base weights
(speed does not depend on the weights): once with ``cache_features=True`` for all the
epochs, once without caching for a few epochs, extrapolated to all the epochs from the
measured steady epoch time. Prints the table, then the speed-up, then the machine.

    python bench/bench_training.py                      # the paper: 600 images, 224 px, 100 epochs
    python bench/bench_training.py --images 120         # quicker, same per-image costs
    python bench/bench_training.py --smoke              # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thyrocad.models.training import TrainConfig, TrainResult, train  # noqa: E402

PER_PATIENT = 5  # the paper: five images per patient
TARGET_SPEEDUP = 40.0
TARGET_SECONDS = 300.0


def machine() -> str:
    """CPU model, usable cores and library versions, for the report's last line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import keras

    versions = f"Keras {keras.__version__} ({keras.backend.backend()})"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions = f"TensorFlow {tf.__version__}, {versions}"
    return f"machine: {cpu}, {cores} cores usable, Python {platform.python_version()}, {versions}"


def synthetic(n_images: int, size: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Speckle-like uint8 images, five per patient (so about n_images), two classes."""
    rng = np.random.default_rng(seed)
    n_patients = max(4, -(-n_images // PER_PATIENT))
    images, labels, patients = [], [], []
    for p in range(n_patients):
        label = "autoimmune" if p % 2 else "normal"
        level = 70.0 if label == "autoimmune" else 140.0
        for _ in range(PER_PATIENT):
            speckle = rng.rayleigh(level / 1.25, (size, size))
            images.append(np.clip(speckle, 0, 255).astype(np.uint8))
            labels.append(label)
            patients.append(f"B{p:04d}")
    return np.stack(images), labels, patients


def timed_train(
    images: np.ndarray, labels: list[str], patients: list[str], config: TrainConfig
) -> tuple[TrainResult, float, list[float]]:
    """Train once; return the result, total seconds and each epoch's end time (from start)."""
    ends: list[float] = []
    start = time.perf_counter()
    result = train(
        images, labels, patients, config, on_epoch=lambda *_: ends.append(time.perf_counter())
    )
    total = time.perf_counter() - start
    return result, total, [end - start for end in ends]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--uncached-epochs", type=int, default=3)
    parser.add_argument("--augment-variants", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.images, args.epochs, args.uncached_epochs = 32, 20, 2, 2
    if args.uncached_epochs < 2:
        parser.error("--uncached-epochs must be >= 2 (the first epoch includes tracing)")

    images, labels, patients = synthetic(args.images, args.size, args.seed)
    config = TrainConfig(
        arch="vgg19",
        input_size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        weights=None,
        seed=args.seed,
        augment_variants=args.augment_variants,
        cache_features=True,
    )
    cached, cached_total, cached_ends = timed_train(images, labels, patients, config)
    uncached_config = TrainConfig(
        **{**config.__dict__, "epochs": args.uncached_epochs, "cache_features": False}
    )
    _, measured_total, ends = timed_train(images, labels, patients, uncached_config)

    # Extrapolation: build + first epoch as measured, then the median steady epoch for
    # every further epoch, then the same final test prediction as measured.
    steady = statistics.median(np.diff(ends))
    extrapolated = ends[0] + steady * (args.epochs - 1) + (measured_total - ends[-1])
    cached_steady = statistics.median(np.diff(cached_ends)) if len(cached_ends) > 1 else 0.0
    n_train = cached.metadata["data"]["images_per_side"]["train"]
    speedup = extrapolated / cached_total

    print(
        f"VGG-19 recipe: {len(images)} images ({n_train} train), {args.size} px, "
        f"batch {args.batch_size}, {args.epochs} epochs, augment variants "
        f"{args.augment_variants}, weights=None"
    )
    print(f"| {'run':<34} | {'epochs':>6} | {'seconds':>9} | {'s/epoch':>8} |")
    print(f"|{'-' * 36}|{'-' * 8}|{'-' * 11}|{'-' * 10}|")
    print(
        f"| {'cached features (measured)':<34} | {args.epochs:>6} | {cached_total:>9.1f} "
        f"| {cached_steady:>8.3f} |"
    )
    print(
        f"| {'  of which build + feature cache':<34} | {'':>6} "
        f"| {cached_ends[0] - cached_steady:>9.1f} | {'':>8} |"
    )
    print(
        f"| {'uncached (measured)':<34} | {args.uncached_epochs:>6} | {measured_total:>9.1f} "
        f"| {steady:>8.3f} |"
    )
    print(
        f"| {'uncached (extrapolated)':<34} | {args.epochs:>6} | {extrapolated:>9.1f} "
        f"| {steady:>8.3f} |"
    )
    print(
        f"targets: speed-up >= {TARGET_SPEEDUP:.0f}x; whole recipe <= {TARGET_SECONDS:.0f} s "
        f"(cached run: {cached_total:.1f} s)"
    )
    print(f"speed-up, uncached extrapolated / cached: {speedup:.1f}x")
    print(machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

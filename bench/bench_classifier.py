"""Benchmark: Classifier.predict latency vs a direct compiled call and vs model.predict.

Builds the model with random weights (latency does not depend on the weights), then
times the three ways to run it, interleaved so a noisy shared machine affects them
alike, and reports medians. Prints the table, the machine, and last the ratios.

    python bench/bench_classifier.py                        # VGG-19, 224 px, batch 1
    python bench/bench_classifier.py --arch inception_v3 --batch 32
    python bench/bench_classifier.py --smoke                # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from thyrocad.models.architectures import build_model  # noqa: E402
from thyrocad.models.classifier import Classifier  # noqa: E402


def machine() -> str:
    """CPU model, usable cores and library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = f"Keras {keras.__version__} ({keras.backend.backend()})"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions = f"TensorFlow {tf.__version__}, {versions}"
    return f"machine: {cpu}, {cores} cores usable, Python {platform.python_version()}, {versions}"


def direct_compiled(model: object, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The baseline: the model called in a tf.function on a float32 batch, nothing else."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)])
    def call(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)  # type: ignore[operator]

    return lambda x: call(tf.constant(x)).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg19", choices=("vgg19", "inception_v3"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.arch, args.size, args.repeats, args.warmup = "vgg19", 32, 5, 1
    if keras.backend.backend() != "tensorflow":
        parser.error("the direct compiled baseline is written for the TensorFlow backend")

    keras.utils.set_random_seed(0)
    model = build_model(args.arch, input_size=args.size, weights=None)
    classifier = Classifier.from_model(
        model, "bench", args.arch, ("autoimmune", "normal"), args.size
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.size, args.size), dtype=np.uint8)
    as_float = images[..., None].astype(np.float32)
    direct = direct_compiled(model, args.size)
    runs: dict[str, Callable[[], object]] = {
        "direct compiled call (tf.function)": lambda: direct(as_float),
        "Classifier.predict": lambda: classifier.predict(images),
        "model.predict": lambda: model.predict(as_float, verbose=0),
    }
    np.testing.assert_allclose(classifier.predict(images), direct(as_float), atol=1e-5)
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    base = median["direct compiled call (tf.function)"]

    print(
        f"{args.arch} at {args.size} px, batch {args.batch}, weights=None, "
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up"
    )
    print(f"| {'way':<36} | {'ms/call':>9} | {'images/s':>9} | {'x direct':>8} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for name, value in median.items():
        print(
            f"| {name:<36} | {value * 1e3:>9.2f} | {args.batch / value:>9.1f} "
            f"| {value / base:>8.3f} |"
        )
    print(machine())
    print(f"ratio model.predict / direct: {median['model.predict'] / base:.3f}x")
    print(f"ratio Classifier.predict / direct: {median['Classifier.predict'] / base:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

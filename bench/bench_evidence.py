"""Benchmark: what the evidence maps cost, Classifier.predict alone vs predict + Grad-CAM.

The inference worker, with THYROCAD_EVIDENCE_MAPS on, runs ``Classifier.predict`` on a
batch and then ``models.gradcam.grad_cam`` on the same batch (a forward pass to the
last convolutional block, the rest of the model with a backward pass to that block)
and encodes each map as a PNG. This times both, interleaved so a noisy shared machine
affects them alike, with random weights (speed does not depend on their values), and
reports medians per image. Prints the table, the machine, and last the ratio.

    python bench/bench_evidence.py                       # VGG-19, 224 px, batch 8
    python bench/bench_evidence.py --arch inception_v3 --size 299 --batch 8
    python bench/bench_evidence.py --smoke               # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from bench.bench_classifier import machine  # noqa: E402
from thyrocad.models.architectures import build_model, get_spec  # noqa: E402
from thyrocad.models.classifier import Classifier  # noqa: E402
from thyrocad.models.gradcam import evidence_png, grad_cam  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg19", choices=("vgg19", "inception_v3"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.arch, args.size, args.batch, args.repeats, args.warmup = "vgg19", 32, 4, 3, 1

    keras.utils.set_random_seed(0)
    classes = ("autoimmune", "normal")
    model = build_model(args.arch, classes, input_size=args.size, weights=None)
    classifier = Classifier.from_model(model, "bench", args.arch, classes, args.size)
    layer = get_spec(args.arch).evidence_layer
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.size, args.size), dtype=np.uint8)

    def with_evidence() -> None:
        classifier.predict(images)
        maps = grad_cam(classifier.model, images, layer, 0, batch_size=classifier.max_batch)
        for cam in maps:
            evidence_png(cam)

    runs: dict[str, Callable[[], object]] = {
        "Classifier.predict": lambda: classifier.predict(images),
        "predict + Grad-CAM + PNG": with_evidence,
    }
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
    base = median["Classifier.predict"]
    grid = grad_cam(classifier.model, images[:1], layer, 0).shape[1:]

    print(
        f"{args.arch} at {args.size} px, batch {args.batch}, weights=None, evidence layer "
        f"{layer} ({grid[0]} x {grid[1]}), median of {args.repeats} interleaved repeats "
        f"after {args.warmup} warm-up"
    )
    print(f"| {'way':<26} | {'ms/image':>9} | {'images/s':>9} | {'x predict':>9} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for name, value in median.items():
        print(
            f"| {name:<26} | {value * 1e3 / args.batch:>9.1f} | {args.batch / value:>9.2f} "
            f"| {value / base:>9.3f} |"
        )
    print(machine())
    ratio = median["predict + Grad-CAM + PNG"] / base
    print(f"ratio predict + Grad-CAM / predict alone: {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

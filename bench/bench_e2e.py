"""Benchmark: end to end, first C-STORE to last prediction in the database, vs the bare model.

The production path on one machine: dcmtk ``storescu`` (TCP_NODELAY=1) → thyrocad's listener
(spool with fsync, registration, Celery task) → PostgreSQL + a private Redis → one inference
worker (solo pool) claiming batches and decoding the next batch while the model runs → its
predictions in the database; a control worker and beat run beside it as in production.

Baseline, measured in the same run before and after the pipeline run: ``Classifier.predict``
(the compiled call) on the same images, preprocessed by the same code (``pacs.pixels``), at
the same batch size, from the same ``.keras`` file. The model has random weights (speed does
not depend on them). The pipeline is warmed up first (model loaded and traced), so the
figure is the steady state of a running service; the sender delivers every study at once, so
the worker never waits for work.

    python bench/bench_e2e.py                          # VGG-19 and Inception v3, 224 px
    python bench/bench_e2e.py --arch inception_v3 --instances 600
    python bench/bench_e2e.py --smoke                  # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    machine,
    percentile,
    pipeline,
    storescu,
    table,
    wait_senders,
    write_studies,
)

TARGETS = {"vgg19": 0.95, "inception_v3": 0.85}
DEFAULT_INSTANCES = {"vgg19": 300, "inception_v3": 900}
PER_STUDY = 5


@dataclass(frozen=True)
class Outcome:
    arch: str
    instances: int
    bare_before: float  # images/s
    bare_after: float
    e2e_seconds: float
    sent_seconds: float  # first C-STORE → the sender's last acknowledgement
    middle_rate: float  # images/s between the 10th and 90th percentile prediction
    model_seconds: float  # the worker's own forward passes, summed
    batches: int

    @property
    def bare(self) -> float:
        return (self.bare_before + self.bare_after) / 2

    @property
    def e2e_rate(self) -> float:
        return self.instances / self.e2e_seconds

    @property
    def ratio(self) -> float:
        return self.e2e_rate / self.bare


def bare_rate(classifier: object, images: np.ndarray, batch: int, seconds: float) -> float:
    """Images/s of ``Classifier.predict`` over ``images`` in batches, for about ``seconds``."""
    predict = classifier.predict  # type: ignore[attr-defined]
    predict(images[:batch])  # the first call at this shape builds oneDNN's kernels
    starts = list(range(0, len(images), batch))
    done = 0
    start = time.perf_counter()
    while True:
        for s in starts:
            done += len(predict(images[s : s + batch]))
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def run(arch: str, args: argparse.Namespace, workdir: Path) -> Outcome:
    from models.registry import Registry
    from pacs.pixels import images_from_file

    n_studies = math.ceil(args.instances / PER_STUDY)
    files = [f for s in write_studies(workdir / "studies", n_studies, size=args.size) for f in s]
    files = files[: args.instances]
    warm = [
        f
        for s in write_studies(
            workdir / "warm", math.ceil(args.warmup / PER_STUDY), size=args.size, prefix="WARM"
        )
        for f in s
    ]
    settings = {
        "THYROCAD_BATCH_MAX": str(args.batch),
        "THYROCAD_STUDY_IDLE_SECONDS": "5",
        "THYROCAD_CLAIM_LEASE_SECONDS": "600",
    }
    with pipeline(workdir, settings, model=(arch, args.size)) as p:
        p.start()
        # Warm-up: the worker loads the model and traces it on its first batches.
        wait_senders([storescu(warm, p.port, log=workdir / "storescu-warm.log")])
        p.wait_count("SELECT count(*) FROM predictions", len(warm), 600, "warm-up predictions")

        registry = Registry(p.data_dir / "models")
        active = registry.active()
        assert active is not None
        classifier = registry.load(active.version)
        images = np.stack([images_from_file(f, classifier.input_size)[0].pixels for f in files])
        before = bare_rate(classifier, images, args.batch, args.baseline_seconds)

        t0 = time.time()
        sender = storescu(files, p.port, log=workdir / "storescu.log")
        wait_senders([sender], timeout=3600)
        sent = time.time() - t0
        total = len(warm) + len(files)
        p.wait_count("SELECT count(*) FROM predictions", total, 3600, "every prediction")
        stamps = [
            float(r[0])  # type: ignore[arg-type]
            for r in p.rows(
                "SELECT extract(epoch FROM created_at) FROM predictions "
                "WHERE created_at >= to_timestamp(:t0) ORDER BY created_at",
                t0=t0,
            )
        ]
        # latency_ms is a batch's forward pass divided by its size; one created_at per batch.
        model_seconds, batches = p.rows(
            "SELECT sum(latency_ms) / 1000.0, count(DISTINCT created_at) FROM predictions "
            "WHERE created_at >= to_timestamp(:t0)",
            t0=t0,
        )[0]
        after = bare_rate(classifier, images, args.batch, args.baseline_seconds)
    lo, hi = percentile(stamps, 10), percentile(stamps, 90)
    middle = 0.8 * len(stamps) / (hi - lo) if hi > lo else float("nan")
    return Outcome(
        arch=arch,
        instances=len(files),
        bare_before=before,
        bare_after=after,
        e2e_seconds=max(stamps) - t0,
        sent_seconds=sent,
        middle_rate=middle,
        model_seconds=float(model_seconds),  # type: ignore[arg-type]
        batches=int(batches),  # type: ignore[call-overload]
    )


def report(o: Outcome, args: argparse.Namespace) -> None:
    print(
        f"\n{o.arch} at {args.size} px, batch {args.batch}, weights=None; "
        f"{o.instances} instances in {math.ceil(o.instances / PER_STUDY)} studies "
        f"(368 x 312 grey screens around {args.size} px tissue, about 115 kB each)"
    )
    rows: list[list[object]] = [
        [
            "bare compiled model (Classifier.predict), before",
            "",
            o.bare_before,
            o.bare_before / o.bare,
        ],
        [
            "bare compiled model (Classifier.predict), after",
            "",
            o.bare_after,
            o.bare_after / o.bare,
        ],
        ["end to end: first C-STORE → last prediction", o.e2e_seconds, o.e2e_rate, o.ratio],
        ["  middle 80 % of the predictions", "", o.middle_rate, o.middle_rate / o.bare],
        [
            "  sender done (last C-STORE acknowledged)",
            o.sent_seconds,
            o.instances / o.sent_seconds,
            "",
        ],
        [
            f"  worker's forward passes, summed ({o.batches} batches)",
            o.model_seconds,
            "",
            "",
        ],
    ]
    print(table(["measure", "seconds", "images/s", "x bare"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="both", choices=("both", "vgg19", "inception_v3"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--instances", type=int, default=0, help="per model (default: 300/900)")
    parser.add_argument("--batch", type=int, default=32, help="THYROCAD_BATCH_MAX and baseline")
    parser.add_argument("--warmup", type=int, default=40, help="instances sent before timing")
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    archs = ["vgg19", "inception_v3"] if args.arch == "both" else [args.arch]
    if args.smoke:
        archs, args.size, args.instances, args.batch = ["vgg19"], 32, 12, 8
        args.warmup, args.baseline_seconds = 5, 0.5
    outcomes = []
    for arch in archs:
        args_arch = argparse.Namespace(**vars(args))
        args_arch.instances = args.instances or DEFAULT_INSTANCES[arch]
        with tempfile.TemporaryDirectory(prefix=f"bench-e2e-{arch}-") as tmp:
            outcome = run(arch, args_arch, Path(tmp))
        report(outcome, args_arch)
        outcomes.append(outcome)
    print(
        "\npipeline: listener + inference worker (solo) + control worker + beat, PostgreSQL + "
        "Redis, sender dcmtk storescu (TCP_NODELAY=1), one association"
    )
    print(machine())
    for o in outcomes:
        print(
            f"ratio end to end / bare model, {o.arch} (target >= {TARGETS.get(o.arch, 0):.2f}): "
            f"{o.ratio:.3f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

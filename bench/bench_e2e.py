"""Benchmark: end to end, first C-STORE to last prediction in the database, vs the bare model.

The production path on one machine: dcmtk ``storescu`` (TCP_NODELAY=1) → thyrocad's listener
(spool with fsync, registration, Celery task) → PostgreSQL + a private Redis → one inference
worker (solo pool) claiming batches and decoding the next batch while the model runs → its
predictions in the database; a control worker and beat run beside it as in production.

Baseline: ``Classifier.predict`` (the compiled call) in this process on the same images,
preprocessed by the same code (``pacs.pixels``), at the same batch size, from the same
``.keras`` file. The model has random weights (speed does not depend on them).

The machine is shared, so the run alternates: baseline, pipeline round, baseline, pipeline
round, ..., baseline. Each round sends new studies, all at once, so the worker always has a
backlog; its ratio is its rate over the mean of the two baselines around it, and the
headline is the median round. The pipeline is warmed up first (model loaded and traced):
the figure is the steady state of a running service. A CPU table shows where the cycles
went: whatever the pipeline spends beside the forward pass is taken from the model.

    python bench/bench_e2e.py                          # VGG-19 and Inception v3, 224 px
    python bench/bench_e2e.py --arch inception_v3 --instances 600 --rounds 5
    python bench/bench_e2e.py --smoke                  # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Pipeline,
    children_cpu_seconds,
    cpu_delta,
    machine,
    median,
    pipeline,
    storescu,
    table,
    wait_senders,
    write_studies,
)

TARGETS = {"vgg19": 0.95, "inception_v3": 0.85}
DEFAULT_INSTANCES = {"vgg19": 100, "inception_v3": 450}  # per round: about 15-20 s each
PER_STUDY = 5


@dataclass(frozen=True)
class Round:
    instances: int
    bare_before: float  # images/s
    bare_after: float
    seconds: float  # first C-STORE → last prediction stored
    sent_seconds: float  # first C-STORE → the sender's last acknowledgement
    model_seconds: float  # the worker's forward passes, summed
    batches: int
    cpu: dict[str, float]  # CPU seconds per process during the round
    bare_cpu_per_image: float  # CPU seconds the bare model spends per image (both baselines)

    @property
    def bare(self) -> float:
        return (self.bare_before + self.bare_after) / 2

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    @property
    def ratio(self) -> float:
        return self.rate / self.bare


@dataclass
class Outcome:
    arch: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return median([r.ratio for r in self.rounds])


def bare_rate(
    classifier: object, images: np.ndarray, batch: int, seconds: float
) -> tuple[float, float]:
    """Images/s of ``Classifier.predict`` over ``images`` in batches, for about ``seconds``,
    and the CPU seconds this process spent per image meanwhile."""
    predict = classifier.predict  # type: ignore[attr-defined]
    starts = list(range(0, len(images), batch))
    done = 0
    start, cpu = time.perf_counter(), time.process_time()
    while True:
        for s in starts:
            done += len(predict(images[s : s + batch]))
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return done / elapsed, (time.process_time() - cpu) / done


def run(arch: str, args: argparse.Namespace, workdir: Path) -> Outcome:
    from thyrocad.models.registry import Registry
    from thyrocad.pacs.pixels import images_from_file

    n_studies = math.ceil(args.instances / PER_STUDY)
    rounds = [
        [
            f
            for s in write_studies(workdir / f"r{r}", n_studies, size=args.size, prefix=f"R{r}_")
            for f in s
        ][: args.instances]
        for r in range(args.rounds)
    ]
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
    outcome = Outcome(arch)
    with pipeline(workdir, settings, model=(arch, args.size)) as p:
        p.start()
        # Warm-up: the worker loads the model and traces it on its first batches.
        wait_senders([storescu(warm, p.port, log=workdir / "storescu-warm.log")])
        p.wait_count("SELECT count(*) FROM predictions", len(warm), 600, "warm-up predictions")

        registry = Registry(p.data_dir / "models")
        active = registry.active()
        assert active is not None
        classifier = registry.load(active.version)
        size = classifier.input_size
        images = [
            np.stack([images_from_file(f, size)[0].pixels for f in files]) for files in rounds
        ]
        classifier.predict(images[0][: args.batch])  # oneDNN builds its kernels per shape
        before, before_cpu = bare_rate(classifier, images[0], args.batch, args.baseline_seconds)
        done = len(warm)
        spies = py_spy(p, args.py_spy) if args.py_spy else []
        for r, files in enumerate(rounds):
            cpu0, children0 = p.cpu(), children_cpu_seconds()
            t0 = time.time()
            wait_senders([storescu(files, p.port, log=workdir / "storescu.log")], timeout=3600)
            sent = time.time() - t0
            done += len(files)
            p.wait_count("SELECT count(*) FROM predictions", done, 3600, "every prediction")
            cpu = cpu_delta(cpu0, p.cpu())
            cpu["storescu (sender)"] = children_cpu_seconds() - children0
            # latency_ms is a batch's forward pass divided by its size; one created_at per batch.
            last, model_seconds, batches = p.rows(
                "SELECT extract(epoch FROM max(created_at)), sum(latency_ms) / 1000.0, "
                "count(DISTINCT created_at) FROM predictions WHERE created_at >= to_timestamp(:t0)",
                t0=t0,
            )[0]
            after, after_cpu = bare_rate(classifier, images[r], args.batch, args.baseline_seconds)
            outcome.rounds.append(
                Round(
                    instances=len(files),
                    bare_before=before,
                    bare_after=after,
                    seconds=float(last) - t0,  # type: ignore[arg-type]
                    sent_seconds=sent,
                    model_seconds=float(model_seconds),  # type: ignore[arg-type]
                    batches=int(batches),  # type: ignore[call-overload]
                    cpu=cpu,
                    bare_cpu_per_image=(before_cpu + after_cpu) / 2,
                )
            )
            before, before_cpu = after, after_cpu
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            spy.wait(60)
    return outcome


def py_spy(p: Pipeline, folder: Path) -> list[subprocess.Popen[bytes]]:
    """Sample the listener's and the workers' Python stacks (GIL holders) during the rounds."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("--py-spy needs py-spy (pip install py-spy)")
    folder.mkdir(parents=True, exist_ok=True)
    spies = []
    for name in ("listener", "inference", "control"):
        out = folder / f"{name}.txt"
        argv = [exe, "record", "--gil", "--threads", "-r", "100", "-f", "raw", "-o", str(out)]
        argv += ["-p", str(p.procs[name].pid)]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)
    return spies


def report(o: Outcome, args: argparse.Namespace) -> None:
    n = o.rounds[0].instances
    print(
        f"\n{o.arch} at {args.size} px, batch {args.batch}, weights=None; {len(o.rounds)} rounds "
        f"of {n} instances in {math.ceil(n / PER_STUDY)} studies (368 x 312 grey screens "
        f"around {args.size} px tissue, about 115 kB each)"
    )
    rows: list[list[object]] = []
    for i, r in enumerate(o.rounds, 1):
        rows.append(
            [
                i,
                r.bare_before,
                r.bare_after,
                r.seconds,
                r.rate,
                r.ratio,
                r.instances / r.sent_seconds,
                r.model_seconds / r.seconds,
                r.batches,
            ]
        )
    print(
        table(
            [
                "round",
                "bare before img/s",
                "bare after img/s",
                "e2e s",
                "e2e img/s",
                "x bare",
                "sender img/s",
                "model busy",
                "batches",
            ],
            rows,
        )
    )
    names = list(o.rounds[0].cpu)
    total = sum(sum(r.cpu.values()) for r in o.rounds)
    instances = sum(r.instances for r in o.rounds)
    model = sum(r.model_seconds for r in o.rounds)
    cpu_rows: list[list[object]] = [
        [
            name,
            sum(r.cpu[name] for r in o.rounds),
            1e3 * sum(r.cpu[name] for r in o.rounds) / instances,
            sum(r.cpu[name] for r in o.rounds) / total,
        ]
        for name in names
    ]
    print(
        f"CPU during the rounds ({total:.1f} s in all; the worker's forward passes took "
        f"{model:.1f} s of wall time):"
    )
    print(table(["process", "CPU s", "CPU ms / instance", "share"], cpu_rows))
    # What the cycles say, whatever else runs on the machine: the bare model needs
    # ``model_cpu`` per image; everything else the pipeline burns per image is ``extra``.
    model_cpu = median([r.bare_cpu_per_image for r in o.rounds])
    extra = total / instances - model_cpu
    print(
        f"CPU per image: bare model {model_cpu * 1e3:.1f} ms; the pipeline's extra "
        f"{extra * 1e3:.1f} ms; if the cores were all ours, end to end / bare would be about "
        f"{model_cpu / (model_cpu + extra):.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="both", choices=("both", "vgg19", "inception_v3"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--instances", type=int, default=0, help="per round (default: VGG-19 100, Inception 450)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="THYROCAD_BATCH_MAX and baseline")
    parser.add_argument("--warmup", type=int, default=40, help="instances sent before timing")
    parser.add_argument("--baseline-seconds", type=float, default=15.0)
    parser.add_argument("--py-spy", type=Path, help="profile the processes into this folder")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    archs = ["vgg19", "inception_v3"] if args.arch == "both" else [args.arch]
    if args.smoke:
        archs, args.size, args.instances, args.batch = ["vgg19"], 32, 12, 8
        args.rounds, args.warmup, args.baseline_seconds = 1, 5, 0.5
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
        "Redis, sender dcmtk storescu (TCP_NODELAY=1), one association; all on this machine"
    )
    print(machine())
    for o in outcomes:
        print(
            f"ratio end to end / bare model, {o.arch}, median of {len(o.rounds)} rounds "
            f"(target >= {TARGETS.get(o.arch, 0):.2f}): {o.ratio:.3f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: study latency, last image received → study result stored, vs the idle time.

A study's result is computed once nothing of it has been received for
``THYROCAD_STUDY_IDLE_SECONDS``; the finalise task runs every
``THYROCAD_FINALISE_INTERVAL_SECONDS`` (1 s by default). The target: latency ≤ idle + 2 s
at the 95th percentile, under half load.

Load: studies of five images, each sent by its own dcmtk ``storescu`` association
(TCP_NODELAY=1) as a modality sends a finished exam, evenly spaced so that images arrive at
``--load`` (default 0.5) times the bare compiled model's rate at batch 32, measured in this
run. The pipeline cannot beat its bare model, so this is at least half its capacity.
"Last image received" is when the sender's last C-STORE was acknowledged (its process
exits); "stored" is when this script first sees the study's result row (polled every 50 ms).

    python bench/bench_study_latency.py                 # VGG-19 and Inception v3, idle 5 s
    python bench/bench_study_latency.py --arch vgg19 --idle 30 --studies 60
    python bench/bench_study_latency.py --smoke         # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Pipeline,
    machine,
    median,
    percentile,
    pipeline,
    storescu,
    table,
    wait_for,
    wait_senders,
    write_studies,
)

PER_STUDY = 5
TARGET_EXTRA_SECONDS = 2.0
DEFAULT_STUDIES = {"vgg19": 40, "inception_v3": 60}


@dataclass(frozen=True)
class Outcome:
    arch: str
    idle: float
    bare_rate: float
    offered_rate: float  # images/s sent
    latencies: list[float]  # last ack → result seen
    inference: list[float]  # last ack → last prediction of the study stored

    @property
    def p95_extra(self) -> float:
        return percentile(self.latencies, 95) - self.idle


def bare_rate(p: Pipeline, files: list[Path], batch: int, seconds: float) -> float:
    """Images/s of the active model's compiled call (Classifier.predict) at ``batch``."""
    from thyrocad.models.registry import Registry
    from thyrocad.pacs.pixels import images_from_file

    registry = Registry(p.data_dir / "models")
    active = registry.active()
    assert active is not None
    classifier = registry.load(active.version)
    images = np.stack([images_from_file(f, classifier.input_size)[0].pixels for f in files])
    images = np.resize(images, (batch, *images.shape[1:]))  # repeat to a full batch
    classifier.predict(images)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done == 0:
        done += len(classifier.predict(images))
    return done / elapsed


def watch_results(p: Pipeline, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when each study's first result row becomes visible."""
    while not stop.is_set():
        rows = p.rows(
            "SELECT s.study_instance_uid FROM studies s WHERE EXISTS "
            "(SELECT 1 FROM study_results r WHERE r.study_id = s.id)"
        )
        now = time.time()
        for (uid,) in rows:
            seen.setdefault(str(uid), now)
        stop.wait(0.05)


def study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def run(arch: str, args: argparse.Namespace, workdir: Path) -> Outcome:
    studies = write_studies(workdir / "studies", args.studies, size=args.size)
    warm = write_studies(workdir / "warm", 2, size=args.size, prefix="WARM")
    settings = {
        "THYROCAD_STUDY_IDLE_SECONDS": str(args.idle),
        "THYROCAD_FINALISE_INTERVAL_SECONDS": str(args.finalise_interval),
        "THYROCAD_BATCH_MAX": str(args.batch),
    }
    with pipeline(workdir, settings, model=(arch, args.size)) as p:
        p.start()
        wait_senders([storescu([f for s in warm for f in s], p.port, log=workdir / "warm.log")])
        p.wait_count("SELECT count(*) FROM study_results", 2, 600, "the warm-up results")
        rate = bare_rate(p, studies[0], args.batch, args.baseline_seconds)
        offered = args.load * rate
        interval = PER_STUDY / offered

        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_results, args=(p, seen, stop), daemon=True)
        watcher.start()
        acked: dict[str, float] = {}
        failed: list[str] = []
        waiters = []

        def send(files: list[Path], uid: str) -> None:
            proc = storescu(files, p.port, log=workdir / "storescu.log")
            if proc.wait(600) == 0:
                acked[uid] = time.time()
            else:
                failed.append(uid)

        uids = [study_uid(s[0]) for s in studies]
        start = time.monotonic()
        for i, (files, uid) in enumerate(zip(studies, uids, strict=True)):
            time.sleep(max(0.0, start + i * interval - time.monotonic()))
            t = threading.Thread(target=send, args=(files, uid), daemon=True)
            t.start()
            waiters.append(t)
        for t in waiters:
            t.join(600)
        if failed:
            raise RuntimeError(f"storescu failed for {len(failed)} studies (see storescu.log)")
        try:
            wait_for(
                lambda: all(uid in seen for uid in uids),
                args.idle + 120,
                "every study's result",
            )
        finally:
            stop.set()
            watcher.join(5)
        predicted = dict(
            p.rows(
                "SELECT s.study_instance_uid, extract(epoch FROM max(pr.created_at)) "
                "FROM studies s JOIN instances i ON i.study_id = s.id "
                "JOIN predictions pr ON pr.instance_id = i.id GROUP BY s.study_instance_uid"
            )
        )
    return Outcome(
        arch=arch,
        idle=args.idle,
        bare_rate=rate,
        offered_rate=offered,
        latencies=[seen[u] - acked[u] for u in uids],
        inference=[float(predicted[u]) - acked[u] for u in uids],  # type: ignore[arg-type]
    )


def report(o: Outcome, args: argparse.Namespace) -> None:
    print(
        f"\n{o.arch} at {args.size} px, batch max {args.batch}: {len(o.latencies)} studies of "
        f"{PER_STUDY} images, one study every {PER_STUDY / o.offered_rate:.2f} s = "
        f"{o.offered_rate:.1f} images/s = {args.load:.2f} x the bare model's "
        f"{o.bare_rate:.1f} images/s; idle {o.idle:g} s, finalise every "
        f"{args.finalise_interval:g} s"
    )
    rows: list[list[object]] = []
    # A study is due once idle since its last image and fully predicted, whichever is later.
    finalise_path = [t - max(i, o.idle) for t, i in zip(o.latencies, o.inference, strict=True)]
    for name, values in (
        ("last image acknowledged → last prediction stored", o.inference),
        ("study due (idle passed, all predicted) → result stored", finalise_path),
        ("last image acknowledged → study result stored", o.latencies),
        ("  the same minus the idle time", [v - o.idle for v in o.latencies]),
    ):
        rows.append([name, median(values), percentile(values, 95), max(values)])
    print(table(["seconds", "p50", "p95", "max"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="both", choices=("both", "vgg19", "inception_v3"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--studies", type=int, default=0, help="default: VGG-19 40, Inception 60")
    parser.add_argument("--idle", type=float, default=5.0, help="THYROCAD_STUDY_IDLE_SECONDS")
    parser.add_argument("--finalise-interval", type=float, default=1.0)
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the bare rate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    archs = ["vgg19", "inception_v3"] if args.arch == "both" else [args.arch]
    if args.smoke:
        archs, args.size, args.studies, args.idle = ["vgg19"], 32, 3, 1.0
        args.batch, args.baseline_seconds = 8, 0.5
    outcomes = []
    for arch in archs:
        args_arch = argparse.Namespace(**vars(args))
        args_arch.studies = args.studies or DEFAULT_STUDIES[arch]
        with tempfile.TemporaryDirectory(prefix=f"bench-latency-{arch}-") as tmp:
            outcome = run(arch, args_arch, Path(tmp))
        report(outcome, args_arch)
        outcomes.append(outcome)
    print(
        "\npipeline: listener + inference worker (solo) + control worker + beat, PostgreSQL + "
        "Redis, senders dcmtk storescu (TCP_NODELAY=1), one association per study"
    )
    print(machine())
    for o in outcomes:
        print(
            f"ratio p95 latency / idle time, {o.arch} (target: p95 - idle <= "
            f"{TARGET_EXTRA_SECONDS:g} s; measured {o.p95_extra:.2f} s): "
            f"{percentile(o.latencies, 95) / o.idle:.3f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

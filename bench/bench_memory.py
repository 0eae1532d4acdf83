"""Benchmark: listener memory after 100 instances vs after many more; worker memory reported.

The whole pipeline runs (listener, inference worker, control worker, beat; PostgreSQL and a
private Redis); four dcmtk ``storescu`` associations at a time send 600 x 800 RGB ultrasound
screens (1.44 MB each). The listener's resident set size (RSS, from ``/proc``) is read once
the first 100 instances are acknowledged and registered, then at every checkpoint up to
``--instances``; the inference worker's RSS once it has predicted the first 100 and once it
has predicted them all. Target: the listener's RSS after all the instances within 10 % of
its RSS after 100.

By default 1,000 instances (about 1.4 GB through the spool, a few minutes); the issue's
figure is 5,000: ``--instances 5000`` (about 7.2 GB of disk, several times longer).

    python bench/bench_memory.py                        # 1,000 instances, Inception v3
    python bench/bench_memory.py --instances 5000 --arch vgg19
    python bench/bench_memory.py --smoke                # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Pipeline,
    machine,
    pipeline,
    storescu,
    table,
    wait_senders,
    write_studies,
)

PER_STUDY = 5
FIRST = 100
TARGET_GROWTH = 1.10


def send_chunk(p: Pipeline, workdir: Path, start: int, count: int, senders: int, kind: str) -> None:
    """Write ``count`` new instances, send them over ``senders`` associations, delete them."""
    folder = workdir / f"chunk{start}"
    studies = write_studies(
        folder, math.ceil(count / PER_STUDY), kind=kind, seed=start, prefix=f"M{start}_"
    )
    files = [f for s in studies for f in s][:count]
    groups = [files[i::senders] for i in range(senders)]
    logs = p.data_dir / "storescu.log"
    wait_senders([storescu(g, p.port, log=logs) for g in groups if g], 3600)
    shutil.rmtree(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000, help="the issue's figure: 5000")
    parser.add_argument("--checkpoint", type=int, default=500, help="RSS read every N instances")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--kind", default="rgb", choices=("rgb", "grey"))
    parser.add_argument("--arch", default="inception_v3", choices=("vgg19", "inception_v3"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    first = FIRST
    if args.smoke:
        first, args.instances, args.checkpoint = 10, 20, 10
        args.arch, args.size, args.kind = "vgg19", 32, "grey"
    if args.instances <= first:
        parser.error(f"--instances must be more than {first}")

    listener: list[tuple[str, float]] = []  # (when, RSS MiB)
    worker: list[tuple[str, float]] = []
    others: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        workdir = Path(tmp)
        with pipeline(workdir, model=(args.arch, args.size)) as p:
            p.start()
            registered = "SELECT count(*) FROM instances"
            predicted = "SELECT count(*) FROM predictions"
            sent = 0
            while sent < args.instances:
                count = first if sent == 0 else min(args.checkpoint, args.instances - sent)
                send_chunk(p, workdir, sent, count, args.senders, args.kind)
                sent += count
                p.wait_count(registered, sent, 600, f"{sent} instances registered")
                listener.append((f"{sent} registered", p.rss_mib("listener")))
                if sent == first:
                    p.wait_count(predicted, first, 900, f"{first} predictions")
                    worker.append((f"{first} predicted", p.rss_mib("inference")))
            timeout = 600 + args.instances * (1.0 if args.arch == "vgg19" else 0.2)
            p.wait_count(predicted, sent, timeout, "every prediction")
            worker.append((f"{sent} predicted", p.rss_mib("inference")))
            listener.append((f"{sent} predicted, quiet", p.rss_mib("listener")))
            others = {name: p.rss_mib(name) for name in ("control", "beat")}

    base = listener[0][1]
    print(
        f"memory: {args.instances} instances ({args.kind}, "
        f"{'600 x 800 RGB, 1.44 MB' if args.kind == 'rgb' else '368 x 312 grey, 115 kB'}), "
        f"{args.senders} concurrent storescu associations; model {args.arch} at {args.size} px"
    )
    rows: list[list[object]] = [["listener", when, rss, rss / base] for when, rss in listener]
    rows += [["inference worker", when, rss, rss / worker[0][1]] for when, rss in worker]
    rows += [
        [f"{name} worker" if name == "control" else name, f"{args.instances} predicted", rss, ""]
        for name, rss in others.items()
    ]
    print(table(["process", "after", "RSS MiB", f"x after {first}"], rows))
    print(machine())
    print(
        f"inference worker RSS: {worker[0][1]:.0f} MiB after {first} predictions, "
        f"{worker[-1][1]:.0f} MiB after {args.instances}"
    )
    print(
        f"ratio listener RSS after {args.instances} / after {first} instances "
        f"(target <= {TARGET_GROWTH:.2f}): {listener[-1][1] / base:.3f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

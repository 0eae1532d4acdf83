"""Benchmark: ingest through thyrocad's listener vs dcmtk's storescp, 4 concurrent associations.

Both receivers get the same files from the same client: four dcmtk ``storescu`` processes at
once, one association each, 128 KiB PDUs, TCP_NODELAY=1 in every dcmtk environment. The
images are 600 x 800 RGB ultrasound screens (1.44 MB each).

- baseline: ``storescp --fork`` writing each file into a folder (dcmtk does not fsync);
- thyrocad: ``thyrocad serve`` doing its real work: parse the header, spool with fsync
  (file and folder), then on its intake thread register in PostgreSQL and publish a Celery
  task to Redis. Its time runs from the first association to the later of the last
  acknowledgement and the last instance registered and queued. ``--listener-processes``
  sets THYROCAD_LISTENER_PROCESSES (storescp --fork uses a process per association too).

The two receivers alternate over ``--repeats`` rounds, each round with new UIDs, and the
medians are compared. After each round, VGG-19's inference rate (compiled call, batch 32,
224 px) is measured in this process, since ingest must stay well ahead of inference; that
ratio is the median of the rounds' ingest over the VGG-19 rate measured right after it.

    python bench/bench_ingest.py                    # 400 instances x 3 rounds
    python bench/bench_ingest.py --instances 1000 --repeats 5
    python bench/bench_ingest.py --listener-processes 2
    python bench/bench_ingest.py --smoke            # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Pipeline,
    children_cpu_seconds,
    cpu_delta,
    dcmtk,
    free_port,
    machine,
    median,
    nodelay_env,
    pipeline,
    port_open,
    stop_process,
    storescu,
    table,
    tree_cpu_seconds,
    wait_for,
    wait_senders,
    write_studies,
)

PER_STUDY = 5
TARGET_VS_STORESCP = 0.5
TARGET_VS_VGG19 = 10.0


def groups(studies: list[list[Path]], senders: int) -> list[list[Path]]:
    """Whole studies dealt round-robin to ``senders`` associations."""
    out: list[list[Path]] = [[] for _ in range(senders)]
    for i, study in enumerate(studies):
        out[i % senders].extend(study)
    return [g for g in out if g]


@dataclass(frozen=True)
class Run:
    seconds: float  # until the receiver is done (thyrocad: registered and queued too)
    acked: float  # until the last acknowledgement
    receiver_cpu: float  # CPU seconds of the receiving side (thyrocad: + PostgreSQL, Redis)
    sender_cpu: float  # CPU seconds of the storescu processes


def send_all(files: list[list[Path]], port: int, called: str, log: Path) -> tuple[float, float]:
    """Seconds for all senders, started together, to finish, and their CPU seconds."""
    start, cpu = time.perf_counter(), children_cpu_seconds()
    wait_senders([storescu(group, port, called=called, log=log) for group in files], 1800)
    return time.perf_counter() - start, children_cpu_seconds() - cpu


def storescp_cpu(pid: int) -> float:
    """CPU seconds of storescp and of the children it forked and reaped (one per association)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def to_storescp(files: list[list[Path]], workdir: Path) -> Run:
    out = workdir / "storescp-out"
    out.mkdir()
    port = free_port()
    argv = [dcmtk("storescp"), "--fork", "-aet", "STORESCP", "-pdu", "131072"]
    argv += ["-od", str(out), str(port)]
    log = open(workdir / "storescp.log", "ab")  # noqa: SIM115 - the child owns it
    server = subprocess.Popen(argv, env=nodelay_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(port), 10, "storescp to listen")
        cpu = storescp_cpu(server.pid)
        seconds, sender_cpu = send_all(files, port, "STORESCP", workdir / "storescu-dcmtk.log")
        received = sum(1 for _ in out.iterdir())
        if received != sum(map(len, files)):
            raise RuntimeError(f"storescp wrote {received} of {sum(map(len, files))} files")
        time.sleep(0.2)  # let storescp reap its children, whose CPU time it then reports
        return Run(seconds, seconds, storescp_cpu(server.pid) - cpu, sender_cpu)
    finally:
        stop_process(server, 5)
        shutil.rmtree(out, ignore_errors=True)


def to_thyrocad(files: list[list[Path]], p: Pipeline, queued_before: int) -> Run:
    """Until the last acknowledgement, and until the last instance registered and queued."""
    n = sum(map(len, files))
    start, cpu = time.perf_counter(), p.cpu()
    acked, sender_cpu = send_all(files, p.port, "THYROCAD", p.data_dir / "storescu.log")
    p.wait_count(
        "SELECT count(*) FROM instances WHERE state = 'queued'",
        queued_before + n,
        120,
        "registration of every instance",
        interval=0.02,
    )
    seconds = time.perf_counter() - start
    return Run(seconds, acked, sum(cpu_delta(cpu, p.cpu()).values()), sender_cpu)


def vgg19(size: int, batch: int) -> Callable[[int], float]:
    """VGG-19 (random weights) behind ``Classifier.predict``; returns ``rate(repeats)``, the
    images/s of its compiled call at ``batch``, median of ``repeats`` calls."""
    import keras

    from thyrocad.models.architectures import build_model
    from thyrocad.models.classifier import Classifier

    keras.utils.set_random_seed(0)
    model = build_model("vgg19", input_size=size, weights=None)
    classifier = Classifier.from_model(model, "bench", "vgg19", ("autoimmune", "normal"), size)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
    classifier.predict(images)

    def rate(repeats: int) -> float:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            classifier.predict(images)
            seconds.append(time.perf_counter() - start)
        return batch / median(seconds)

    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400, help="per round")
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per receiver")
    parser.add_argument("--vgg-size", type=int, default=224)
    parser.add_argument("--vgg-repeats", type=int, default=2, help="batches of 32 per round")
    parser.add_argument(
        "--listener-processes",
        type=int,
        default=1,
        help="THYROCAD_LISTENER_PROCESSES: listener processes sharing the port",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.instances, args.repeats, args.vgg_size, args.vgg_repeats = 10, 1, 32, 2

    n_studies = math.ceil(args.instances / PER_STUDY)
    dcmtk_runs: list[Run] = []
    ours: list[Run] = []
    listener_cpu: list[float] = []
    vgg: list[float] = []
    vgg_rate = vgg19(args.vgg_size, 32)  # measured after every round, beside the ingest
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        with pipeline(workdir, {"THYROCAD_LISTENER_PROCESSES": str(args.listener_processes)}) as p:
            p.start("listener")
            pid = p.procs["listener"].pid
            queued = 0
            for r in range(args.repeats):
                studies = write_studies(
                    workdir / f"round{r}", n_studies, kind="rgb", seed=r, prefix=f"R{r}"
                )
                files = groups(studies, args.senders)
                n = sum(map(len, files))
                # Alternate which receiver goes first, so neither always gets a warmer cache.
                order = ("dcmtk", "thyrocad") if r % 2 == 0 else ("thyrocad", "dcmtk")
                for who in order:
                    if who == "dcmtk":
                        dcmtk_runs.append(to_storescp(files, workdir))
                    else:
                        cpu0 = tree_cpu_seconds(pid)
                        ours.append(to_thyrocad(files, p, queued))
                        listener_cpu.append((tree_cpu_seconds(pid) - cpu0) / n)
                        queued += n
                shutil.rmtree(workdir / f"round{r}")
                vgg.append(vgg_rate(args.vgg_repeats))
            listener_rss = p.rss_mib("listener")

    n = n_studies * PER_STUDY
    dcmtk_rate = n / median([r.seconds for r in dcmtk_runs])
    ours_rate = n / median([r.seconds for r in ours])
    acked_rate = n / median([r.acked for r in ours])
    print(
        f"ingest: thyrocad with {args.listener_processes} listener process(es); "
        f"{n} instances per round (600 x 800 RGB, 1.44 MB), {args.senders} concurrent "
        f"storescu associations, 128 KiB PDUs, TCP_NODELAY=1; median of {args.repeats} "
        "alternating rounds"
    )

    def ms(runs: list[Run], attr: str) -> float:
        return 1e3 * median([getattr(r, attr) for r in runs]) / n

    rows: list[list[object]] = [
        [
            "dcmtk storescp --fork (no fsync)",
            median([r.seconds for r in dcmtk_runs]),
            dcmtk_rate,
            1.0,
            ms(dcmtk_runs, "receiver_cpu"),
            ms(dcmtk_runs, "sender_cpu"),
        ],
        ["thyrocad: last acknowledgement", median([r.acked for r in ours]), acked_rate, "", "", ""],
        [
            "thyrocad: acknowledged + registered + queued",
            median([r.seconds for r in ours]),
            ours_rate,
            ours_rate / dcmtk_rate,
            ms(ours, "receiver_cpu"),
            ms(ours, "sender_cpu"),
        ],
        [f"VGG-19 compiled call, batch 32, {args.vgg_size} px", "", median(vgg), "", "", ""],
    ]
    headers = ["receiver", "seconds", "instances/s", "x storescp"]
    headers += ["receiver CPU ms/inst", "senders CPU ms/inst"]
    print(table(headers, rows))
    print(
        f"thyrocad's receiving side: listener {median(listener_cpu) * 1e3:.1f} ms CPU per "
        "instance, the rest PostgreSQL and Redis; "
        f"listener RSS {listener_rss:.0f} MiB after {n * args.repeats} instances"
    )
    print(
        "every round: "
        + ", ".join(f"storescp {n / r.seconds:.0f}/s" for r in dcmtk_runs)
        + "; "
        + ", ".join(f"thyrocad {n / r.seconds:.0f}/s" for r in ours)
        + "; "
        + ", ".join(f"VGG-19 {v:.1f}/s" for v in vgg)
    )
    print(machine())
    print(
        f"ratio thyrocad / storescp instances/s (target >= {TARGET_VS_STORESCP}): "
        f"{ours_rate / dcmtk_rate:.3f}x"
    )
    # Each round's ingest over the VGG-19 rate measured right after it, median of rounds.
    vs_vgg = median([n / r.seconds / v for r, v in zip(ours, vgg, strict=True)])
    print(
        f"ratio thyrocad ingest / VGG-19 inference rate, median of rounds "
        f"(target >= {TARGET_VS_VGG19:.0f}): {vs_vgg:.1f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

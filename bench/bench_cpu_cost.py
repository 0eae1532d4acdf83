"""Benchmark: CPU milliseconds per 1.44 MB ultrasound image spent outside the model.

What a GPU worker needs fed: every image costs CPU in the listener (receive, parse, spool
with fsync, register, queue), in PostgreSQL and Redis, in the worker (claim, decode, crop,
grey, resize, store the prediction) and in the aggregation. Each is measured as CPU time
(user + system) of the process doing the work, over 600 x 800 RGB screens (1.44 MB, as
``bench_ingest.py`` sends them), four concurrent ``storescu`` associations:

- **listener**: the production ``thyrocad serve`` process, CPU of its process tree from the
  first association until every instance is registered and queued; PostgreSQL backends of
  the benchmark's database and the private Redis meanwhile;
- **worker**: ``worker.inference.run_inference`` in this process on those instances, with a
  stand-in classifier that returns fixed probabilities (the model is not what is measured;
  everything around it is the production code), then ``finalise_due`` (aggregation);
- **breakdown** (this process, new instances): pynetdicom's transport alone (the listener's
  AE and socket tuning, a handler that only takes the received buffer), header parse and
  validation, the spool write (SHA-256, write, fsync of file and folder; fsync's wall time
  shown apart: it is waiting, not CPU), registration and the Celery publish, then decode
  + crop + grey + resize alone;
- **the spool reconciler**: one periodic pass (``pacs.intake.reconcile_spool``, files
  written since 10 s before the last pass) over these instances, by the spool that wrote
  them, as the listener's own reconciler runs (counted in the total), and by one that did
  not (the files of another listener process). At the 60 s default a file is in one
  pass, or two when written within 10 s before a pass: the total counts one.

Baseline in the same run: a bare ``pydicom.dcmread`` + ``dcmwrite`` of the same file in
memory. Rounds repeat with new UIDs; figures are medians of the rounds (each round shown).

    python bench/bench_cpu_cost.py                  # 200 instances x 2 rounds
    python bench/bench_cpu_cost.py --py-spy DIR     # also record the listener and worker stacks
    python bench/bench_cpu_cost.py --smoke          # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CLASSES,
    Pipeline,
    cpu_seconds,
    free_port,
    machine,
    median,
    pipeline,
    postgres_backends,
    postgres_database,
    storescu,
    table,
    tree_cpu_seconds,
    wait_senders,
    write_studies,
)

PER_STUDY = 5
TARGET_MS = 8.0
STUB_VERSION = "bench-cpu-cost-stub"


def own_cpu() -> float:
    """User + system CPU seconds of this process, all threads (children excluded)."""
    return time.process_time()


@dataclass
class Meter:
    """CPU seconds of this process and of PostgreSQL + Redis over a block."""

    p: Pipeline
    db_url: str = ""  # default: the pipeline's database
    mine: float = 0.0
    services: float = 0.0
    wall: float = 0.0

    def services_cpu(self) -> float:
        used = sum(cpu_seconds(pid) for pid in postgres_backends(self.db_url or self.p.db_url))
        return used + (cpu_seconds(self.p.redis_pid) if self.p.redis_pid else 0.0)

    @contextmanager
    def measure(self) -> Iterator[Meter]:
        mine, services, wall = own_cpu(), self.services_cpu(), time.perf_counter()
        try:
            yield self
        finally:
            self.mine += own_cpu() - mine
            self.services += self.services_cpu() - services
            self.wall += time.perf_counter() - wall


def groups(studies: list[list[Path]], senders: int) -> list[list[Path]]:
    out: list[list[Path]] = [[] for _ in range(senders)]
    for i, study in enumerate(studies):
        out[i % senders].extend(study)
    return [g for g in out if g]


def send(files: list[list[Path]], port: int, called: str, log: Path) -> None:
    wait_senders([storescu(g, port, called=called, log=log) for g in files], 1800)


class StubClassifier:
    """Stands in for the model: fixed probabilities, no computation."""

    version = STUB_VERSION
    architecture = "vgg19"
    classes = CLASSES
    precision = "float32"

    def __init__(self, input_size: int) -> None:
        self.input_size = input_size
        self.max_batch = 32

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.tile(np.array([[0.25, 0.75]], dtype=np.float32), (len(images), 1))


def activate_stub(db_url: str, input_size: int, folder: Path) -> None:
    """Register the stand-in as the active model version (the worker asks the database)."""
    from thyrocad.db import repository
    from thyrocad.db.engine import make_engine, make_session_factory
    from thyrocad.db.records import ModelVersionRecord

    artifact = folder / STUB_VERSION / "model.keras"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_bytes(b"stand-in")
    engine = make_engine(db_url)
    with make_session_factory(engine).begin() as session:
        repository.upsert_model_version(
            session, ModelVersionRecord(STUB_VERSION, "vgg19", CLASSES, input_size, str(artifact))
        )
        repository.set_active_model(session, STUB_VERSION)
    engine.dispose()


def worker_context(p: Pipeline, input_size: int) -> Any:
    from thyrocad.settings import load_settings
    from thyrocad.worker.context import WorkerContext
    from thyrocad.worker.model_holder import ModelHolder

    stub = StubClassifier(input_size)

    class StubHolder(ModelHolder):
        def get(self, active: Any) -> Any:
            return stub

    settings = load_settings(
        database_url=p.db_url,
        celery_broker_url=p.broker_url,
        data_dir=p.data_dir,
        batch_wait_seconds=0.0,
        study_idle_seconds=0.0,
        evidence_maps=False,
    )
    ctx = WorkerContext.from_settings(settings)
    ctx.models = StubHolder()
    return ctx


# --------------------------------------------------------------------------- the stages


@dataclass
class Round:
    n: int
    listener: float = 0.0  # CPU s of the listener process tree
    listener_services: float = 0.0  # PostgreSQL + Redis meanwhile
    worker: float = 0.0
    worker_services: float = 0.0
    aggregation: float = 0.0
    aggregation_services: float = 0.0
    transport: float = 0.0
    parse: float = 0.0
    sha256: float = 0.0
    spool: float = 0.0
    spool_wall: float = 0.0
    fsync_wall: float = 0.0
    register: float = 0.0
    register_services: float = 0.0
    publish: float = 0.0
    publish_services: float = 0.0
    reconcile: float = 0.0
    reconcile_services: float = 0.0
    reconcile_foreign: float = 0.0
    reconcile_foreign_services: float = 0.0
    decode: float = 0.0
    baseline: float = 0.0


def pipeline_round(p: Pipeline, r: int, n_studies: int, senders: int, size: int) -> Round:
    """The listener process, then the worker and aggregation in this process."""
    from thyrocad.worker.aggregation import finalise_due
    from thyrocad.worker.inference import run_inference

    studies = write_studies(
        p.data_dir.parent / f"round{r}", n_studies, kind="rgb", seed=r, prefix=f"C{r}"
    )
    files = groups(studies, senders)
    n = sum(map(len, files))
    out = Round(n)
    before = p.scalar("SELECT count(*) FROM instances WHERE state = 'queued'")
    pid = p.procs["listener"].pid
    meter = Meter(p)
    cpu0 = tree_cpu_seconds(pid)
    with meter.measure():
        send(files, p.port, "THYROCAD", p.data_dir / "storescu.log")
        p.wait_count(
            "SELECT count(*) FROM instances WHERE state = 'queued'",
            int(before or 0) + n,  # type: ignore[call-overload]
            120,
            "registration of every instance",
            interval=0.02,
        )
    out.listener = tree_cpu_seconds(pid) - cpu0
    out.listener_services = meter.services

    ctx = worker_context(p, size)
    try:
        meter = Meter(p)
        with meter.measure():
            outcome = run_inference(ctx)
        if outcome.predicted != n:
            raise RuntimeError(f"the worker predicted {outcome.predicted} of {n} instances")
        out.worker, out.worker_services = meter.mine, meter.services
        meter = Meter(p)
        with meter.measure():
            done = finalise_due(ctx, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        if len(done) != n_studies:
            raise RuntimeError(f"{len(done)} of {n_studies} studies finalised")
        out.aggregation, out.aggregation_services = meter.mine, meter.services
    finally:
        ctx.engine.dispose()
    shutil.rmtree(p.data_dir.parent / f"round{r}")
    return out


def transport_only(files: list[list[Path]], workdir: Path) -> float:
    """CPU seconds of this process receiving ``files`` with the listener's AE and tuning,
    a handler that takes the received buffer and nothing else."""
    from pynetdicom import evt

    from thyrocad.pacs.association_io import TransportLimits, tune_association
    from thyrocad.pacs.listener import ListenerConfig, make_ae
    from thyrocad.pacs.received import received_parts

    config = ListenerConfig(ae_title="BENCH-SCP", host="127.0.0.1", port=free_port())
    ae = make_ae(config)
    limits = TransportLimits(config.max_pdu_size, config.acse_timeout, config.network_timeout)

    def store(event: Any) -> int:
        with received_parts(event):
            pass
        return 0x0000

    handlers: list[Any] = [
        (evt.EVT_C_STORE, store),
        (evt.EVT_CONN_OPEN, tune_association, [limits]),
    ]
    server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        cpu = own_cpu()
        send(files, config.port, "BENCH-SCP", workdir / "storescu-transport.log")
        return own_cpu() - cpu
    finally:
        server.shutdown()


def breakdown_round(
    p: Pipeline, r: int, n_studies: int, senders: int, size: int, out: Round
) -> None:
    """Each listener step alone on new instances, in this process; then decode alone."""
    from pydicom import dcmread, dcmwrite

    from thyrocad.db.engine import make_engine, make_session_factory, upgrade
    from thyrocad.pacs.intake import reconcile_spool, register_and_publish, to_record
    from thyrocad.pacs.meta import describe, read_dataset
    from thyrocad.pacs.pixels import FramePolicy, images_from_file
    from thyrocad.pacs.spool import Spool
    from thyrocad.serve import publisher
    from thyrocad.settings import load_settings
    from thyrocad.worker.app import create_app

    folder = p.data_dir.parent / f"parts{r}"
    studies = write_studies(folder, n_studies, kind="rgb", seed=100 + r, prefix=f"B{r}")
    files = groups(studies, senders)
    paths = [path for group in files for path in group]
    out.transport = transport_only(files, p.data_dir)
    blobs = [path.read_bytes() for path in paths]

    started = own_cpu()
    for blob in blobs:
        ds = dcmread(io.BytesIO(blob))
        dcmwrite(io.BytesIO(), ds, enforce_file_format=True)
    out.baseline = own_cpu() - started

    started = own_cpu()
    metas = []
    for blob in blobs:
        ds = read_dataset([blob])
        metas.append(describe(ds, str(ds.file_meta.TransferSyntaxUID)))
    out.parse = own_cpu() - started

    import hashlib

    started = own_cpu()
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
    out.sha256 = own_cpu() - started

    spool = Spool(folder / "spool")
    written_at = time.time()
    started, wall = own_cpu(), time.perf_counter()
    entries = [
        spool.write(m.sop_instance_uid, [blob]) for m, blob in zip(metas, blobs, strict=True)
    ]
    out.spool, out.spool_wall = own_cpu() - started, time.perf_counter() - wall
    scratch = folder / "fsync-scratch"
    scratch.mkdir()
    wall = 0.0
    for i, blob in enumerate(blobs):
        with (scratch / f"{i}.dcm").open("wb") as handle:
            handle.write(blob)
            handle.flush()
            started_sync = time.perf_counter()
            os.fsync(handle.fileno())
            wall += time.perf_counter() - started_sync
    out.fsync_wall = wall

    # A database of its own: these instances must not wait for the next round's worker.
    with postgres_database() as db_url:
        upgrade(db_url)
        settings = load_settings(database_url=db_url, celery_broker_url=p.broker_url)
        publish = publisher(create_app(settings))
        engine = make_engine(db_url)
        sessions = make_session_factory(engine)
        records = [to_record(m, e) for m, e in zip(metas, entries, strict=True)]
        publish_meter = Meter(p, db_url)

        def timed_publish(ids: list[int]) -> None:
            with publish_meter.measure():
                publish(ids)

        register_and_publish(sessions, records[:1], timed_publish)  # connect and warm up
        publish_meter = Meter(p, db_url)
        meter = Meter(p, db_url)
        with meter.measure():
            for start in range(1, len(records), 64):  # the intake's batches
                register_and_publish(sessions, records[start : start + 64], timed_publish)
        registered = len(records) - 1
        scale = len(records) / registered
        out.publish = publish_meter.mine * scale
        out.publish_services = publish_meter.services * scale
        out.register = (meter.mine - publish_meter.mine) * scale
        out.register_services = (meter.services - publish_meter.services) * scale
        # The listener's periodic spool reconciler, one pass over the files written since
        # the last: with the spool that wrote them (the listener's own), and with a spool
        # that did not (another listener process; a listener restarted since).
        since = written_at - 10.0  # serve.RECONCILE_MARGIN_SECONDS before the writes
        for attr, who in (("reconcile", spool), ("reconcile_foreign", Spool(spool.root))):
            meter = Meter(p, db_url)
            with meter.measure():
                found = reconcile_spool(who, sessions, publish, modified_since=since)
            if found:
                raise RuntimeError(f"the reconciler found {found} unregistered instances")
            setattr(out, attr, meter.mine)
            setattr(out, f"{attr}_services", meter.services)
        engine.dispose()

    policy = FramePolicy()
    started = own_cpu()
    for entry in entries:
        images_from_file(entry.path, size, policy)
    out.decode = own_cpu() - started
    shutil.rmtree(folder)


# --------------------------------------------------------------------------- report


def py_spy(pid: int, target: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not installed (pip install py-spy): no profile", file=sys.stderr)
        return None
    argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
    argv += ["--output", str(target), "--threads", "--gil", "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_spy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200, help="per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations")
    parser.add_argument("--input-size", type=int, default=224, help="the model's input side")
    parser.add_argument("--py-spy", type=Path, default=None, help="record stacks into DIR")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.instances, args.rounds = 10, 1
    n_studies = math.ceil(args.instances / PER_STUDY)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-cost-") as tmp:
        workdir = Path(tmp)
        with pipeline(workdir) as p:
            activate_stub(p.db_url, args.input_size, p.data_dir / "models")
            p.start("listener")
            spies: list[subprocess.Popen[bytes] | None] = []
            if args.py_spy:
                args.py_spy.mkdir(parents=True, exist_ok=True)
                spies = [
                    py_spy(p.procs["listener"].pid, args.py_spy / "listener.txt"),
                    py_spy(os.getpid(), args.py_spy / "bench-process.txt"),
                ]
            try:
                for r in range(args.rounds):
                    out = pipeline_round(p, r, n_studies, args.senders, args.input_size)
                    breakdown_round(p, r, n_studies, args.senders, args.input_size, out)
                    rounds.append(out)
            finally:
                for spy in spies:
                    stop_spy(spy)
    report(rounds, args)
    return 0


def report(rounds: list[Round], args: argparse.Namespace) -> None:
    def per_image(r: Round, *attrs: str) -> float:
        return sum(1e3 * getattr(r, a) / r.n for a in attrs if a)

    def ms(*attrs: str) -> float:
        return median([per_image(r, *attrs) for r in rounds])

    def row(label: str, mine: str, services: str = "") -> list[object]:
        each = " / ".join(f"{per_image(r, mine, services):.2f}" for r in rounds)
        return [label, ms(mine), ms(services) if services else "", ms(mine, services), each]

    stages = [
        ("listener", "listener_services"),
        ("reconcile", "reconcile_services"),
        ("worker", "worker_services"),
        ("aggregation", "aggregation_services"),
    ]
    attrs = [a for pair in stages for a in pair]
    total = ms(*attrs)
    n = rounds[0].n
    print(
        f"CPU cost per image outside the model: {n} instances per round (600 x 800 RGB, "
        f"1.44 MB), {args.senders} concurrent storescu associations, model input "
        f"{args.input_size} px; median of {len(rounds)} rounds"
    )
    rows: list[list[object]] = [
        row("listener process (receive, parse, spool, register, queue)", *stages[0]),
        row("listener's spool reconciler, one pass", *stages[1]),
        row("worker: claim, decode, crop, grey, resize, store", *stages[2]),
        row("aggregation: finalise the studies", *stages[3]),
        [
            "TOTAL outside the model",
            ms(*(mine for mine, _ in stages)),
            ms(*(services for _, services in stages)),
            total,
            " / ".join(f"{per_image(r, *attrs):.2f}" for r in rounds),
        ],
        ["each step alone, in this process:", "", "", "", ""],
        row("  pynetdicom transport (listener's AE, no work)", "transport"),
        row("  header parse + validation", "parse"),
        row("  spool: SHA-256, write, fsync file + folder", "spool"),
        row("    of which SHA-256", "sha256"),
        row("  registration (batches of 64)", "register", "register_services"),
        row("  Celery publish + mark queued", "publish", "publish_services"),
        row(
            "  reconciler pass, files another process wrote",
            *("reconcile_foreign", "reconcile_foreign_services"),
        ),
        row("  decode + crop + grey + resize", "decode"),
        row("baseline: pydicom dcmread + dcmwrite in memory", "baseline"),
    ]
    headers = ["stage", "process ms/img", "PostgreSQL+Redis ms/img", "ms/img", "rounds"]
    print(table(headers, rows))
    steps = ms("transport", "parse", "spool", "register", "register_services", "publish")
    steps += ms("publish_services")
    print(
        f"the listener's steps alone add up to {steps:.2f} ms/image, in the listener "
        f"{ms(*stages[0]):.2f}; spool wall time {ms('spool_wall'):.2f} ms/image, of which "
        f"the file's fsync {ms('fsync_wall'):.2f} ms (waiting on the disk, not CPU)"
    )
    print(machine())
    print(
        f"ratio total CPU outside the model / target {TARGET_MS:.0f} ms: {total / TARGET_MS:.2f} x"
    )
    print(
        "ratio total CPU outside the model / bare dcmread + dcmwrite: "
        f"{total / ms('baseline'):.1f} x"
    )


if __name__ == "__main__":
    raise SystemExit(main())

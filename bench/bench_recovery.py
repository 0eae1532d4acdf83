"""Benchmark: time to recover from each fault, against a run with no fault in the same run.

Every case starts the production processes afresh (listener, solo inference worker,
control worker, beat) on a private PostgreSQL cluster and a private Redis (both may be
stopped), sends ``--instances`` synthetic instances (five per study) with dcmtk's
``storescu`` over one association, and injects its fault once the worker has
predicted a tenth of them:

* ``none``: the baseline;
* ``worker SIGKILL``: the inference worker is killed mid-batch and restarted at once;
* ``PostgreSQL stopped``: the cluster is stopped for ``--outage`` seconds;
* ``Redis stopped``: the broker is stopped for ``--outage`` seconds;
* ``listener SIGKILL``: the listener is killed and restarted, and the sender, whose
  association broke, sends the whole set again (a re-sent instance is counted, never
  processed twice).

Reported per case: seconds from the end of the send, and from the fault's end, to the
last study result stored; instances lost and predictions duplicated (both must be 0).
The ratio is settle time after the send, each fault / no fault.

    python bench/bench_recovery.py                 # 300 instances, 20 s outages
    python bench/bench_recovery.py --smoke         # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Pipeline,
    free_port,
    machine,
    register_model,
    storescu,
    table,
    wait_for,
    write_studies,
)
from tests.integration.test_operations import private_postgres  # noqa: E402
from tests.procs import redis_server  # noqa: E402

FAULTS = ("none", "worker SIGKILL", "PostgreSQL stopped", "Redis stopped", "listener SIGKILL")
PER_STUDY = 5


@dataclass(frozen=True)
class Outcome:
    fault: str
    after_send: float  # send finished → last study result stored
    after_fault: float | None  # fault's end → last study result stored
    lost: int
    duplicated: int


def _number(p: Pipeline, sql: str) -> float:
    return float(p.scalar(sql) or 0)  # type: ignore[arg-type]


def _send(p: Pipeline, files: list[Path]) -> int:
    sender = storescu(files, p.port, log=p.data_dir / "storescu.log")
    return sender.wait(600)


def run_case(fault: str, workdir: Path, files: list[Path], args: argparse.Namespace) -> Outcome:
    settings = {
        "THYROCAD_STUDY_IDLE_SECONDS": str(args.idle),
        "THYROCAD_BATCH_MAX": "16",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        db_url, stop_db, start_db = stack.enter_context(private_postgres())
        redis_port, stop_redis, start_redis = stack.enter_context(redis_server(workdir))
        p = Pipeline(
            data_dir=workdir / "data",
            db_url=db_url,
            broker_url=f"redis://127.0.0.1:{redis_port}/0",
            port=free_port(),
            settings=settings,
        )
        p.data_dir.mkdir(parents=True, exist_ok=True)
        stack.callback(p.dispose)
        stack.callback(p.stop)
        register_model("vgg19", args.size, p.data_dir / "models", p.env)
        p.start()
        total = len(files)
        sender = storescu(files, p.port, log=p.data_dir / "storescu.log")
        fault_end: float | None = None
        if fault != "none":
            predicted = "SELECT count(*) FROM instances WHERE state = 'predicted'"
            wait_for(lambda: int(p.scalar(predicted) or 0) >= total // 10, 300, "a tenth")
            servers = (stop_db, start_db), (stop_redis, start_redis)
            fault_end = inject(fault, p, *servers, outage=args.outage)
        code = sender.wait(600)
        if fault == "listener SIGKILL":
            code = _send(p, files)  # the modality sends the study again
        if code != 0:
            raise RuntimeError(f"storescu exited with {code} ({fault})")
        sent = time.time()
        p.wait_count(
            "SELECT count(*) FROM study_results_latest", total // PER_STUDY, 900, "every result"
        )
        last = _number(p, "SELECT extract(epoch FROM max(created_at)) FROM study_results")
        lost = total - int(_number(p, "SELECT count(*) FROM instances WHERE state = 'predicted'"))
        duplicated = int(_number(p, "SELECT count(*) FROM predictions")) - (total - lost)
        return Outcome(
            fault,
            last - sent,
            None if fault_end is None else last - fault_end,
            lost,
            duplicated,
        )


def inject(
    fault: str,
    p: Pipeline,
    db: tuple[Callable[[], None], Callable[[], None]],
    redis: tuple[Callable[[], None], Callable[[], None]],
    outage: float = 20.0,
) -> float:
    """Inject ``fault``; return the wall-clock time (epoch) at which it ended."""
    if fault in ("worker SIGKILL", "listener SIGKILL"):
        name = "inference" if fault == "worker SIGKILL" else "listener"
        proc = p.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        p.start(name)
    elif fault == "PostgreSQL stopped":
        p.dispose()
        db[0]()
        time.sleep(outage)
        db[1]()
    elif fault == "Redis stopped":
        redis[0]()
        time.sleep(outage)
        redis[1]()
    else:
        raise ValueError(fault)
    return time.time()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds a server is down")
    parser.add_argument("--idle", type=float, default=5.0, help="THYROCAD_STUDY_IDLE_SECONDS")
    parser.add_argument("--size", type=int, default=32, help="model input size (px)")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if args.smoke:
        args.instances, args.outage, args.idle = 40, 3.0, 1.0
        faults = ["none", "worker SIGKILL"]
    if faults[0] != "none":
        faults.insert(0, "none")
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="thyrocad-recovery-") as tmp:
        root = Path(tmp)
        studies = write_studies(root / "studies", args.instances // PER_STUDY, size=64)
        files = [path for study in studies for path in study]
        for n, fault in enumerate(faults):
            outcomes.append(run_case(fault, root / f"case{n}", files, args))
    baseline = outcomes[0].after_send
    rows = [
        (
            o.fault,
            o.after_send,
            "" if o.after_fault is None else o.after_fault,
            o.after_send / baseline if baseline > 0 else float("nan"),
            o.lost,
            o.duplicated,
        )
        for o in outcomes
    ]
    print(f"{len(files)} instances in {len(files) // PER_STUDY} studies, outages {args.outage:g} s")
    print(
        table(
            ("fault", "settle after send (s)", "after fault end (s)", "× none", "lost", "dup"),
            rows,
        )
    )
    print(machine())
    worst = max(outcomes[1:], key=lambda o: o.after_send, default=outcomes[0])
    print(
        f"ratio settle time, worst fault ({worst.fault}) / no fault: "
        f"{worst.after_send / baseline:.2f}x"
    )
    return 0 if all(o.lost == 0 and o.duplicated == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

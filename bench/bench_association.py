"""Benchmark: one pynetdicom association as the listener runs it vs pynetdicom as shipped.

A pynetdicom storage SCP in this process whose C-STORE handler only takes the encoded data
set (no parse, spool or database: the transport alone), receiving 600 x 800 RGB screens
(1.44 MB) from ``--senders`` dcmtk ``storescu`` at once (128 KiB PDUs, TCP_NODELAY=1):

- baseline: pynetdicom's defaults (4 KiB reads, reactor threads polling every millisecond,
  the "standard" logging handlers formatting every PDU and message);
- thyrocad: the listener's settings (``pacs.association_io.tune_association`` at connection
  open, no standard logging handlers).

Rounds alternate between the two; each measures instances/s and this process's CPU per
instance (the sender runs in its own process). The ratios are of the medians.

    python bench/bench_association.py                 # 100 instances x 3 rounds each
    python bench/bench_association.py --senders 4     # four associations at once
    python bench/bench_association.py --smoke         # tiny: proves the script runs
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    free_port,
    machine,
    median,
    storescu,
    table,
    wait_senders,
    write_studies,
)

PER_STUDY = 5


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def receive(groups: list[list[Path]], tuned: bool, workdir: Path) -> tuple[float, float]:
    """Seconds and CPU seconds of this process while one storescu per group sends it."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import UltrasoundImageStorage  # type: ignore[attr-defined]

    from thyrocad.pacs.association_io import tune_association

    # Read when an association is made: set per round.
    _config.LOG_HANDLER_LEVEL = "none" if tuned else "standard"
    ae = AE(ae_title="BENCH-SCP")
    ae.maximum_pdu_size = 131072
    ae.add_supported_context(
        UltrasoundImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )

    def store(event: Any) -> int:
        event.encoded_dataset(include_meta=True)
        return 0x0000

    handlers: list[Any] = [(evt.EVT_C_STORE, store)]
    if tuned:
        handlers.append((evt.EVT_CONN_OPEN, tune_association))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        start, cpu = time.perf_counter(), process_cpu()
        log = workdir / f"storescu-{'tuned' if tuned else 'stock'}.log"
        wait_senders([storescu(g, port, called="BENCH-SCP", log=log) for g in groups], 600)
        return time.perf_counter() - start, process_cpu() - cpu
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100, help="per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per configuration")
    parser.add_argument("--senders", type=int, default=1, help="concurrent associations")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.instances, args.repeats = 5, 1

    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-association-") as tmp:
        workdir = Path(tmp)
        studies = write_studies(
            workdir / "studies", math.ceil(args.instances / PER_STUDY), kind="rgb", prefix="A"
        )
        files = [path for study in studies for path in study][: args.instances]
        groups = [files[i :: args.senders] for i in range(args.senders)]
        receive([files[:PER_STUDY]], True, workdir)  # warm up imports and caches
        for r in range(args.repeats):
            # Alternate which goes first, so neither always gets a warmer cache.
            for tuned in (False, True) if r % 2 == 0 else (True, False):
                runs[tuned].append(receive(groups, tuned, workdir))

    n = len(files)
    rows: list[list[object]] = []
    rates: dict[bool, float] = {}
    cpu_ms: dict[bool, float] = {}
    for tuned, label in ((False, "pynetdicom as shipped"), (True, "as thyrocad's listener")):
        rates[tuned] = n / median([seconds for seconds, _ in runs[tuned]])
        cpu_ms[tuned] = 1e3 * median([cpu for _, cpu in runs[tuned]]) / n
        rounds = ", ".join(f"{n / seconds:.0f}/s" for seconds, _ in runs[tuned])
        rows.append([label, rates[tuned], cpu_ms[tuned], rounds])
    print(
        f"{args.senders} association(s), {n} instances per round (600 x 800 RGB, 1.44 MB), "
        "dcmtk storescu, "
        f"128 KiB PDUs, TCP_NODELAY=1; the handler only takes the encoded data set; "
        f"median of {args.repeats} alternating rounds"
    )
    print(table(["receiver", "instances/s", "CPU ms / instance", "rounds"], rows))
    print(machine())
    print(f"ratio CPU per instance, thyrocad / as shipped: {cpu_ms[True] / cpu_ms[False]:.3f}x")
    print(f"ratio instances/s, thyrocad / as shipped: {rates[True] / rates[False]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

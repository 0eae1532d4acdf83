"""A thyrocad deployment for integration tests: its processes, database and DICOM peer."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from tests.procs import port_open, stop, thyrocad, wait_for
from thyrocad.pacs.sender import Peer

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"

# The production layout in miniature: listener, an inference worker, a worker for
# the light queues, and the scheduler.
PROCESSES: dict[str, tuple[str, ...]] = {
    "listener": ("serve",),
    "inference": ("worker", "--queues", "inference", "--pool", "solo", "--name", "inf"),
    "control": (
        "worker",
        "--queues",
        "aggregation,maintenance",
        "--pool",
        "threads",
        "--concurrency",
        "2",
        "--name",
        "ctl",
    ),
    "beat": ("beat",),
}


@dataclass
class Pipeline:
    env: dict[str, str]
    port: int
    data_dir: Path
    engine: sa.Engine
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, *names: str) -> None:
        """Start the named processes (all of ``PROCESSES`` by default), each logging to a file."""
        for name in names or PROCESSES:
            self.procs[name] = thyrocad(
                *PROCESSES[name], env=self.env, log=self.data_dir / f"{name}.log"
            )
        if "listener" in (names or PROCESSES):
            wait_for(lambda: port_open(self.port), 60, "the listener port")

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if sig == signal.SIGKILL:
            proc.kill()
            proc.wait()
        else:
            stop(proc)

    def peer(self) -> Peer:
        return Peer("127.0.0.1", self.port, "THYROCAD")

    def states(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT state, count(*) FROM instances GROUP BY state"))
            return {state: int(n) for state, n in rows.tuples()}

    def scalar(self, sql: str) -> object:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.data_dir.glob("*.log")
        )


def send_raw(files: list[Path], peer: Peer, calling: str) -> list[int]:
    """C-STORE files byte for byte (the SCU does not parse them); return the statuses."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    ae.add_requested_context(US_IMAGE_STORAGE)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()

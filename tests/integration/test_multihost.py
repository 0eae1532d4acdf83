"""thyrocad on five machines: network namespaces on a private subnet, made by the test.

Hosts (``tests/integration/netns.py``), each with its own network, host name and mounts:

* ``central`` (10.213.0.1): a private PostgreSQL and a private Redis bound to its
  address only (never the machine's own), the control worker and beat;
* ``listener``: ``thyrocad serve``;
* ``gpu1``, ``gpu2``: one solo inference worker each;
* ``modality``: sends studies with dcmtk's ``storescu`` to the listener's address.

Shared storage is done as an NFS mount would be: an "export" folder on the test's disk
is bind-mounted inside each host's own mount namespace at the same path,
``/tmp/thymh<pid>/data/spool`` and ``…/models`` (read-only on the inference hosts).
That path stays an empty folder for every process outside those namespaces, so a host
that reads or writes the spool or the registry does so through its mount and nothing
else; a bind mount per namespace (rather than one folder every process can see)
catches a process that writes where it should only read, or reads a path that only
exists on the host that wrote it. The rest of ``THYROCAD_DATA_DIR`` is a folder of each
host's own, also mounted at that path, as each machine has its own disk.

The first round proves the split: every instance predicted exactly once and both
inference hosts predicted some (seen twice: a trigger the test adds to the database logs
which worker held each claim, and each worker's ``/metrics``, scraped from ``central``
as Prometheus would). The second round kills every process of one inference host
(SIGKILL) while it holds a claim; the other finishes everything once the dead host's
claims expire (``THYROCAD_CLAIM_LEASE_SECONDS`` is short here), and every study gets a
result. Skipped where namespaces cannot be made (not root, no ``ip``/``unshare``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration import netns
from tests.integration.netns import Host, Lab, Mount
from tests.procs import stop, wait_for
from thyrocad.synthetic import write_synthetic_set

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DICOM_PORT = 11112
METRICS_PORT = 9100  # the image's port, the same on every host (each has its own network)
BEAT_METRICS_PORT = 9101  # beat shares the central host with the control worker
PG_PASSWORD = "multihost-pg"
REDIS_PASSWORD = "multihost-redis"
CALLING_AET = "MODALITY1"
GPU_HOSTS = ("gpu1", "gpu2")
STUDIES = 6  # five images each
LEASE_SECONDS = 4

# Which worker held each claim, and which one saved the prediction (claimed_by is
# cleared when an instance is predicted, so the product keeps no such history).
CLAIM_LOG = """
CREATE TABLE test_claim_log (
    instance_id integer NOT NULL,
    worker text,
    event text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
GRANT INSERT, SELECT ON test_claim_log TO thyrocad;
CREATE FUNCTION test_log_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'processing' AND NEW.claim_token IS DISTINCT FROM OLD.claim_token THEN
        INSERT INTO test_claim_log (instance_id, worker, event)
        VALUES (NEW.id, NEW.claimed_by, 'claimed');
    ELSIF NEW.state = 'predicted' AND OLD.state = 'processing' THEN
        INSERT INTO test_claim_log (instance_id, worker, event)
        VALUES (NEW.id, OLD.claimed_by, 'predicted');
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_log_claim AFTER UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION test_log_claim();
"""

PROCESSES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (host, thyrocad arguments)
    "listener": ("listener", ("serve",)),
    "gpu1": ("gpu1", ("worker", "--queues", "inference", "--pool", "solo", "--name", "gpu1")),
    "gpu2": ("gpu2", ("worker", "--queues", "inference", "--pool", "solo", "--name", "gpu2")),
    "control": (
        "central",
        (
            "worker",
            "--queues",
            "aggregation,maintenance",
            "--pool",
            "threads",
            "--concurrency",
            "2",
            "--name",
            "control",
        ),
    ),
    "beat": ("central", ("beat",)),
}


@dataclass
class Site:
    lab: Lab
    folder: Path
    data_path: Path  # THYROCAD_DATA_DIR on every host
    engine: sa.Engine  # the test's own way in: PostgreSQL's unix socket
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.lab.hosts[name]

    def mounts(self, host: str) -> list[Mount]:
        """What each machine mounts: its own disk at the data path, then the shares."""
        own = self.folder / "hosts" / host / "data"
        (own / "spool").mkdir(parents=True, exist_ok=True)  # mount points
        export = self.folder / "export"
        if host == "central":
            # The storage server: the registry is on its own disk, elsewhere, linked in.
            if not (own / "models").is_symlink():
                (own / "models").symlink_to(export / "models")
            return [Mount(own, self.data_path)]
        (own / "models").mkdir(exist_ok=True)
        spool = Mount(export / "spool", self.data_path / "spool", readonly=host != "listener")
        models = Mount(export / "models", self.data_path / "models", readonly=True)
        return [Mount(own, self.data_path), spool, *([models] if host in GPU_HOSTS else [])]

    def thyrocad(self, host: str, *args: str, log: str, extra: dict[str, str] | None = None):
        argv = [sys.executable, "-m", "thyrocad", *args]
        env = {
            **self.env,
            "THYROCAD_METRICS_HOST": self.host(host).address,  # its private network only
            **(extra or {}),
        }
        if host == "listener":
            # The default THYROCAD_DATA_DIR (./thyrocad-data), started from the folder
            # that holds it; every other machine names the same folder by its full path
            # and runs from a folder of its own.
            del env["THYROCAD_DATA_DIR"]
            cwd = self.data_path.parent
        else:
            cwd = self.folder / "hosts" / host
        cwd.mkdir(parents=True, exist_ok=True)
        # Only the storage server (central) sees the export where it really is.
        hide = [] if host == "central" else [self.folder / "export"]
        out = open(self.folder / f"{log}.log", "ab")  # noqa: SIM115 - owned by the process
        return subprocess.Popen(
            self.lab.command(self.host(host), argv, self.mounts(host), hide),
            env={k: v for k, v in env.items() if v is not None},
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def cli(self, host: str, *args: str) -> str:
        proc = self.thyrocad(host, *args, log=f"cli-{host}")
        proc.wait(300)
        if proc.returncode != 0:
            raise AssertionError(f"thyrocad {' '.join(args)} on {host} failed:\n{self.logs()}")
        return (self.folder / f"cli-{host}.log").read_text(errors="replace")

    def start(self, *names: str) -> None:
        for name in names:
            host, args = PROCESSES[name]
            extra = {"THYROCAD_METRICS_PORT": str(BEAT_METRICS_PORT)} if name == "beat" else {}
            self.procs[name] = self.thyrocad(host, *args, log=name, extra=extra)

    def rows(self, sql: str, **params: object) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]

    def scalar(self, sql: str, **params: object) -> object:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def get(self, host: str, port: int, path: str, *, from_host: str = "central") -> tuple:
        url = f"http://{self.host(host).address}:{port}{path}"

        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError as exc:
                return 0, str(exc)

        return self.lab.call(self.host(from_host), fetch)

    def predictions_counted(self, host: str) -> float:
        """``thyrocad_predictions_total`` of the worker on ``host``, scraped over the network."""
        status, text = self.get(host, METRICS_PORT, "/metrics")
        assert status == 200, text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("thyrocad_predictions_total{")
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.folder.glob("*.log"))
        )


def _reachable(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    made = Lab()
    try:
        for name in ("listener", "gpu1", "gpu2", "modality"):
            made.add(name)
        yield made
    finally:
        made.close()


def _start_postgres(lab: Lab) -> tuple[str, list[str]]:
    """PostgreSQL on central's address (and a unix socket for the test): its URL and the
    command that stops it."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not bins:
        pytest.fail("PostgreSQL server binaries are required (/usr/lib/postgresql/*/bin)")
    pg = lab.scratch("pg")
    shutil.chown(pg, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    lab.run(lab.central, [*as_pg, str(bins[-1] / "initdb"), "-D", str(pg / "data"), "-A", "trust",
                          "-U", "postgres", "--no-sync"])  # fmt: skip
    with open(pg / "data" / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {lab.subnet}.0/24 scram-sha-256\n")
    options = f"-p 5432 -k {pg} -c listen_addresses={lab.central.address} -c fsync=off"
    lab.run(
        lab.central,
        [*as_pg, str(bins[-1] / "pg_ctl"), "-D", str(pg / "data"), "-l", str(pg / "log"),
         "-o", options, "-w", "start"],
    )  # fmt: skip
    stop_it = [*as_pg, str(bins[-1] / "pg_ctl"), "-D", str(pg / "data"), "-m", "fast", "stop"]
    return f"postgresql+psycopg2://postgres@/postgres?host={pg}&port=5432", stop_it


@pytest.fixture(scope="module")
def site(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, str]
) -> Iterator[Site]:
    registry, version = tiny_model
    folder = tmp_path_factory.mktemp("multihost")
    (folder / "export" / "spool").mkdir(parents=True)
    shutil.copytree(registry / version, folder / "export" / "models" / version)
    admin_url, stop_postgres = _start_postgres(lab)
    redis = subprocess.Popen(
        lab.command(
            lab.central,
            ["redis-server", "--bind", lab.central.address, "--port", "6379", "--requirepass",
             REDIS_PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        ),
        stdout=open(folder / "redis.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE thyrocad LOGIN PASSWORD '{PG_PASSWORD}'"))
        conn.execute(sa.text("CREATE DATABASE thyrocad OWNER thyrocad"))
    admin.dispose()
    central = lab.central.address
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("THYROCAD_") and k not in ("DATABASE_URL", "CELERY_BROKER_URL")
    }
    data_path = lab.mount_root / "thyrocad-data"
    data_path.mkdir()
    env.update(
        {
            "DATABASE_URL": f"postgresql+psycopg2://thyrocad:{PG_PASSWORD}@{central}:5432/thyrocad",
            "CELERY_BROKER_URL": f"redis://:{REDIS_PASSWORD}@{central}:6379/0",
            "THYROCAD_DATA_DIR": str(data_path),
            "THYROCAD_METRICS_PORT": str(METRICS_PORT),
            "THYROCAD_ALLOWED_AETS": CALLING_AET,
            "THYROCAD_CLAIM_LEASE_SECONDS": str(LEASE_SECONDS),
            "THYROCAD_REQUEUE_INTERVAL_SECONDS": "2",
            "THYROCAD_REQUEUE_STALE_SECONDS": "3",
            "THYROCAD_STUDY_IDLE_SECONDS": "2",
            "THYROCAD_BATCH_MAX": "4",
            "THYROCAD_RECONCILE_INTERVAL_SECONDS": "5",
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
    )
    db_url = admin_url.replace("/postgres?", "/thyrocad?")
    s = Site(lab, folder, data_path, sa.create_engine(db_url), env)
    try:
        wait_for(
            lambda: lab.call(lab.central, lambda: _reachable(central, 6379)), 20, "redis on central"
        )
        s.cli("central", "db", "upgrade")
        with s.engine.begin() as conn:
            conn.execute(sa.text(CLAIM_LOG))
        s.cli("central", "models", "promote", version, "--registry", str(data_path / "models"))
        s.start(*PROCESSES)
        listener = s.host("listener").address
        wait_for(
            lambda: lab.call(s.host("modality"), lambda: _reachable(listener, DICOM_PORT)),
            90,
            lambda: f"the listener at {listener}:{DICOM_PORT}\n{s.logs()}",
        )
        # Every process answers /readyz to the central host (where Prometheus would be).
        for name, (host, _) in PROCESSES.items():
            port = BEAT_METRICS_PORT if name == "beat" else METRICS_PORT
            wait_for(
                lambda host=host, port=port: s.get(host, port, "/readyz")[0] == 200,
                180,
                lambda name=name, host=host, port=port: (
                    f"{name} ready: {s.get(host, port, '/readyz')}\n{s.logs()}"
                ),
                interval=1.0,
            )
        yield s
    finally:
        for proc in s.procs.values():
            stop(proc, 10)
        redis.kill()
        s.engine.dispose()
        lab.run(lab.central, stop_postgres)
        # Whatever is left in a namespace goes with the lab fixture.


def _send(site: Site, seed: int) -> tuple[list[Path], subprocess.Popen[bytes]]:
    """Start storescu on the modality host with ``STUDIES`` studies; (files, its process)."""
    written = write_synthetic_set(
        site.folder / f"studies-{seed}", STUDIES, seed=seed, size=64, id_prefix=f"MH{seed}"
    )
    files = [path for patient in written for path in patient.paths]
    argv = ["/usr/bin/storescu", "-aet", CALLING_AET, "-aec", "THYROCAD",
            site.host("listener").address, str(DICOM_PORT), *map(str, files)]  # fmt: skip
    log = open(site.folder / f"storescu-{seed}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        site.lab.command(site.host("modality"), argv), stdout=log, stderr=subprocess.STDOUT
    )
    return files, proc


def _round(site: Site, seed: int) -> str:
    """SQL condition selecting the instances of one round (by their study's UID)."""
    return (
        "study_id IN (SELECT s.id FROM studies s JOIN patients p ON p.id = s.patient_id "
        f"WHERE p.patient_key LIKE 'MH{seed}%')"
    )


def _settled(site: Site, seed: int, files: list[Path]) -> None:
    where = _round(site, seed)

    def done() -> bool:
        predicted = site.scalar(
            f"SELECT count(*) FROM instances WHERE state = 'predicted' AND {where}"
        )
        results = site.scalar(
            "SELECT count(*) FROM study_results_latest r JOIN studies s "
            "ON s.study_instance_uid = r.study_instance_uid WHERE s.id IN "
            f"(SELECT study_id FROM instances WHERE {where})"
        )
        return predicted == len(files) and results == STUDIES

    wait_for(
        done,
        120,
        lambda: (
            f"{len(files)} predictions and {STUDIES} results: "
            + str(
                site.rows(
                    f"SELECT state, reason, count(*) FROM instances WHERE {where} "
                    "GROUP BY state, reason"
                )
            )
            + f"\n{site.logs()}"
        ),
        interval=0.5,
    )


def _exactly_once(site: Site, seed: int, files: list[Path]) -> None:
    where = _round(site, seed)
    per_instance = site.rows(
        "SELECT instance_id, model_version, count(*) FROM predictions "
        f"WHERE instance_id IN (SELECT id FROM instances WHERE {where}) "
        "GROUP BY instance_id, model_version"
    )
    assert len(per_instance) == len(files), per_instance
    assert all(n == 1 for _, _, n in per_instance), per_instance
    assert len({version for _, version, _ in per_instance}) == 1
    assert site.scalar(f"SELECT count(*) FROM instances WHERE {where}") == len(files)


def _predicted_by(site: Site, seed: int) -> dict[str, int]:
    rows = site.rows(
        "SELECT worker, count(*) FROM test_claim_log WHERE event = 'predicted' AND instance_id "
        f"IN (SELECT id FROM instances WHERE {_round(site, seed)}) GROUP BY worker"
    )
    return {str(worker): int(n) for worker, n in rows}


def test_studies_from_another_host_are_split_over_two_worker_hosts(site: Site) -> None:
    files, sender = _send(site, seed=71)
    assert sender.wait(120) == 0, (site.folder / "storescu-71.log").read_text()
    _settled(site, 71, files)
    _exactly_once(site, 71, files)

    by_worker = _predicted_by(site, 71)
    assert sum(by_worker.values()) == len(files), by_worker
    # The worker names are Celery's node name (--name, then the host name) and pool slot.
    assert set(by_worker) == {"gpu1@gpu1/0", "gpu2@gpu2/0"}, by_worker
    assert all(n > 0 for n in by_worker.values()), by_worker
    # Each worker counted what it predicted; Prometheus on central would see the same.
    counted = {gpu: site.predictions_counted(gpu) for gpu in ("gpu1", "gpu2")}
    assert counted == {"gpu1": by_worker["gpu1@gpu1/0"], "gpu2": by_worker["gpu2@gpu2/0"]}
    sys.stderr.write(f"\n{len(files)} instances predicted by {by_worker}\n")

    # The listener saw the modality's own address, not a local one.
    addresses = site.rows(
        "SELECT DISTINCT details->>'address' FROM audit_events WHERE kind = 'association'"
    )
    assert [a.split(":")[0] for (a,) in addresses] == [site.host("modality").address]
    # The spool holds the instances on the share, where the listener wrote them, and the
    # path each process used is empty outside the hosts that mount it.
    paths = [p for (p,) in site.rows(f"SELECT spool_path FROM instances WHERE {_round(site, 71)}")]
    assert all(p.startswith(str(site.data_path / "spool") + "/") for p in paths), paths[:3]
    export = site.folder / "export" / "spool"
    assert all((export / Path(p).relative_to(site.data_path / "spool")).is_file() for p in paths)
    assert not any(site.data_path.iterdir())


def _hold_a_claim_then_die(site: Site, victim: str, total: int, seed: int) -> list[int]:
    """Freeze every process of ``victim``'s host while it holds claims, then SIGKILL them
    all; the instances it held."""
    host = site.host(victim)
    where = _round(site, seed)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        held = site.rows(
            f"SELECT id FROM instances WHERE state = 'processing' AND claimed_by = :w AND {where}",
            w=f"{victim}@{victim}/0",
        )
        if held:
            site.lab.kill_host(host, signal.SIGSTOP)
            held = site.rows(
                "SELECT id FROM instances WHERE state = 'processing' AND claimed_by = :w "
                f"AND {where}",
                w=f"{victim}@{victim}/0",
            )
            if held:
                site.lab.kill_host(host, signal.SIGKILL)
                site.procs.pop(victim).wait(10)
                return [i for (i,) in held]
            site.lab.kill_host(host, signal.SIGCONT)
        predicted = site.scalar(
            f"SELECT count(*) FROM instances WHERE state='predicted' AND {where}"
        )
        if predicted == total:
            break
        time.sleep(0.05)
    raise AssertionError(f"{victim} never held a claim mid-round\n{site.logs()}")


def test_a_worker_host_killed_mid_batch_leaves_the_other_to_finish(site: Site) -> None:
    # gpu1 is frozen (SIGSTOP) until gpu2 dies, so that gpu2 surely holds claims then.
    survivor = site.host("gpu1")
    site.lab.kill_host(survivor, signal.SIGSTOP)
    try:
        files, sender = _send(site, seed=72)
        held = _hold_a_claim_then_die(site, "gpu2", len(files), 72)
    finally:
        site.lab.kill_host(survivor, signal.SIGCONT)
    killed_at = time.monotonic()
    assert sender.wait(120) == 0, (site.folder / "storescu-72.log").read_text()
    assert not netns.netns_pids(site.host("gpu2").netns), "a process survived on gpu2"
    _settled(site, 72, files)
    took = time.monotonic() - killed_at
    _exactly_once(site, 72, files)

    by_worker = _predicted_by(site, 72)
    held_then = set(held)
    finished_by = dict(
        site.rows(
            "SELECT instance_id, worker FROM test_claim_log WHERE event = 'predicted' "
            "AND instance_id = ANY(:ids)",
            ids=list(held_then),
        )
    )
    # What the dead host held was predicted by the survivor, after its lease ran out.
    assert set(finished_by) == held_then, (held, finished_by)
    assert set(finished_by.values()) == {"gpu1@gpu1/0"}, finished_by
    assert by_worker.get("gpu1@gpu1/0", 0) >= len(held_then), by_worker
    assert sum(by_worker.values()) == len(files), by_worker
    sys.stderr.write(
        f"\nkilled gpu2 holding {len(held)} claims; everything settled {took:.1f} s later "
        f"(lease {LEASE_SECONDS} s); predicted by {by_worker}\n"
    )
    assert json.loads(site.get("gpu1", METRICS_PORT, "/readyz")[1])["ready"] is True

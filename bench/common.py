"""What the pipeline benchmarks share: the machine line, timing, tables, synthetic studies,
throw-away PostgreSQL and Redis, a registered model, and the pipeline's real processes.

Nothing here is timed by itself; each ``bench_*.py`` decides what to measure. The
processes are the production ones (``python -m thyrocad serve|worker|beat``), started with
the same command lines as ``thyrocad serve --embedded``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES = ("autoimmune", "normal")
DEFAULT_PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


# --------------------------------------------------------------------------- report lines


def machine() -> str:
    """``machine: CPU, cores, load, Python, TensorFlow/Keras`` for a benchmark's report."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = "TensorFlow not loaded"
    if "keras" in sys.modules:
        import keras

        versions = f"Keras {keras.__version__} ({keras.backend.backend()})"
        if "tensorflow" in sys.modules:
            import tensorflow as tf

            versions = f"TensorFlow {tf.__version__}, {versions}"
    return (
        f"machine: {cpu}, {cores} cores usable, load average {load:.1f} at the end, "
        f"Python {platform.python_version()}, {versions}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with 3 significant decimals, numbers right-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    texts = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in texts)) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows if row[i] != "")
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in texts]
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation, as numpy computes it."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``predicate`` until true; RuntimeError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live descendants (a listener's processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu_seconds(current)
        todo += children.get(current, [])
    return total


def children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children (e.g. finished storescu runs)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def postgres_backends(db_url: str) -> list[int]:
    """Process ids of the PostgreSQL backends connected to this URL's database."""
    from sqlalchemy.engine import make_url

    name = make_url(db_url).database or ""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres:") and f" {name} " in title:
            found.append(int(entry.name))
    return found


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


# --------------------------------------------------------------------------- synthetic data


def _screen_templates(kind: str, size: int, count: int, seed: int) -> list[np.ndarray]:
    """Distinct tissue images: grey ``size`` px squares, or RGB 512 x 656 (a 600 x 800,
    1.44 MB screen once framed like a scanner's)."""
    from PIL import Image

    from thyrocad.models.synth import synth_patient

    rng = np.random.default_rng(seed)
    tissues: list[np.ndarray] = []
    label = 0
    while len(tissues) < count:
        images = synth_patient(rng, ("autoimmune", "normal")[label % 2], max(size, 32))
        label += 1
        for image in images:
            grey = image.pixels
            if kind == "rgb":
                big = np.asarray(
                    Image.fromarray(grey).resize((656, 512), Image.Resampling.BILINEAR)
                )
                # A faint colour cast, as scanners store grey B-mode in RGB.
                tissues.append(np.stack([big, big, (big * 0.95).astype(np.uint8)], axis=-1))
            else:
                tissues.append(grey)
    return tissues[:count]


def write_studies(
    out: Path,
    studies: int,
    per_study: int = 5,
    *,
    kind: str = "grey",
    size: int = 224,
    seed: int = 0,
    prefix: str = "BENCH",
    distinct: int = 10,
) -> list[list[Path]]:
    """Write ``studies`` synthetic ultrasound studies of ``per_study`` images under ``out``.

    ``kind="grey"``: ``size`` px grey tissue inside a scanner-like screen (368 x 312 for
    224 px, about 115 kB). ``kind="rgb"``: a 600 x 800 RGB screen (1.44 MB). ``distinct``
    pixel images are made once and reused; every file has its own patient, study, series
    and SOP Instance UIDs, so each is a new instance to the pipeline. Returns the paths per
    study, in sending order.
    """
    from pydicom import dcmwrite

    from thyrocad.pacs.dicom_files import PatientInfo, StudyInfo, uid_from, ultrasound_dataset

    if kind not in ("grey", "rgb"):
        raise ValueError("kind is 'grey' or 'rgb'")
    tissues = _screen_templates(kind, size, distinct, seed)
    templates = []
    for index, tissue in enumerate(tissues):
        ds = ultrasound_dataset(
            tissue,
            patient=PatientInfo(patient_id="TEMPLATE", patient_name="SYNTHETIC^TEMPLATE"),
            study=StudyInfo(
                study_instance_uid=uid_from(f"bench/{seed}/template/study"),
                study_date="20260105",
                study_time="101500",
                accession_number="TEMPLATE",
            ),
            series_instance_uid=uid_from(f"bench/{seed}/template/series"),
            sop_instance_uid=uid_from(f"bench/{seed}/template/{index}"),
            instance_number=1,
            view="RIGHT LOBE TRANS",
            synthetic=True,
        )
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        templates.append(ds)
    run = uuid.uuid4().hex[:12]  # new UIDs every run: nothing is a re-send of an earlier one
    written: list[list[Path]] = []
    for s in range(studies):
        folder = out / f"{prefix}{s:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = uid_from(f"bench/{run}/{prefix}/{s}/study")
        series_uid = uid_from(f"bench/{run}/{prefix}/{s}/series")
        paths = []
        for n in range(per_study):
            ds = templates[(s * per_study + n) % len(templates)]
            sop_uid = uid_from(f"bench/{run}/{prefix}/{s}/{n}")
            ds.PatientID = f"{prefix}{s:05d}"
            ds.PatientName = f"SYNTHETIC^{prefix}{s:05d}"
            ds.AccessionNumber = f"{prefix[:4]}{s:05d}"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = n + 1
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            path = folder / f"{n + 1}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
        written.append(paths)
    return written


# --------------------------------------------------------------------------- dcmtk


def dcmtk(tool: str) -> str:
    """The path of a dcmtk binary; pynetdicom installs Python apps of the same names."""
    folders = [os.environ.get("DCMTK_BIN", ""), "/usr/bin", "/usr/local/bin"]
    folders += os.environ.get("PATH", "").split(os.pathsep)
    for folder in filter(None, folders):
        path = Path(folder) / tool
        if path.is_file() and os.access(path, os.X_OK):
            with path.open("rb") as handle:
                if handle.read(2) != b"#!":  # a script is pynetdicom's, not dcmtk's
                    return str(path)
    raise RuntimeError(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")


def nodelay_env() -> dict[str, str]:
    """dcmtk turns Nagle's algorithm off only when told to in its environment."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    files: Sequence[Path],
    port: int,
    *,
    called: str = "THYROCAD",
    calling: str = "BENCH",
    max_pdu: int = 131072,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start dcmtk's storescu sending ``files`` over one association (TCP_NODELAY=1)."""
    argv = [
        dcmtk("storescu"),
        "-aet",
        calling,
        "-aec",
        called,
        "-R",
        "--max-pdu",
        str(max_pdu),
        "-nh",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    return subprocess.Popen(argv, env=nodelay_env(), stdout=out, stderr=subprocess.STDOUT)


def wait_senders(senders: Sequence[subprocess.Popen[bytes]], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    for proc in senders:
        code = proc.wait(max(1.0, deadline - time.monotonic()))
        if code != 0:
            raise RuntimeError(f"storescu exited with {code} (see its log)")


# --------------------------------------------------------------------------- services


def postgres_admin_url() -> str:
    return os.environ.get("THYROCAD_TEST_PG", DEFAULT_PG_ADMIN)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards); yields its URL."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    admin = sa.create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    name = f"thyrocad_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_admin_url()).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[tuple[int, int]]:
    """A private Redis (no persistence) on a free port; yields its port and process id."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 10, "redis to listen")
        yield port, proc.pid
    finally:
        stop_process(proc, 5)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def register_model(arch: str, size: int, registry: Path, env: Mapping[str, str]) -> str:
    """Build ``arch`` at ``size`` px with random weights (speed does not depend on them),
    save it as a registry version and make it the active model; return the version."""
    import keras

    from thyrocad.db.engine import upgrade
    from thyrocad.models.architectures import build_model
    from thyrocad.models.registry import Registry
    from thyrocad.settings import load_settings
    from thyrocad.worker.versions import promote_version

    keras.utils.set_random_seed(0)
    model = build_model(arch, classes=CLASSES, input_size=size, weights=None)
    saved = Registry(registry).save(
        model, {"architecture": arch, "classes": list(CLASSES), "input_size": size}
    )
    settings = load_settings(
        database_url=env["DATABASE_URL"], data_dir=Path(env["THYROCAD_DATA_DIR"])
    )
    upgrade(settings.db_url)
    promote_version(settings, saved.version, registry)
    return saved.version


# --------------------------------------------------------------------------- the pipeline


def process_argv() -> dict[str, list[str]]:
    """The production command lines (those of ``thyrocad serve --embedded``)."""
    from thyrocad.embedded import process_commands

    return process_commands()


@dataclass
class Pipeline:
    """thyrocad's processes on one data folder, PostgreSQL database and Redis."""

    data_dir: Path
    db_url: str
    broker_url: str
    port: int
    settings: Mapping[str, str] = field(default_factory=dict)
    redis_pid: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            "THYROCAD_DATA_DIR": str(self.data_dir),
            "DATABASE_URL": self.db_url,
            "CELERY_BROKER_URL": self.broker_url,
            "THYROCAD_PORT": str(self.port),
            "THYROCAD_HOST": "127.0.0.1",
            "THYROCAD_RETRAIN_INTERVAL_SECONDS": "0",
            "THYROCAD_SPOOL_MIN_FREE_MB": "64",
            **self.settings,
        }

    def start(self, *names: str) -> None:
        """Start the named processes (all four by default); wait for the listener's port."""
        argv = process_argv()
        env = {**os.environ, **self.env}
        for name in names or tuple(argv):
            log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
            self.procs[name] = subprocess.Popen(
                argv[name], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        if "listener" in self.procs:
            wait_for(
                lambda: port_open(self.port) or self._dead("listener"), 120, "the listener port"
            )
            self._check("listener")

    def _dead(self, name: str) -> bool:
        return self.procs[name].poll() is not None

    def _check(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            if self._dead(name):
                raise RuntimeError(f"{name} exited early:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def rss_mib(self, name: str) -> float:
        return rss_mib(self.procs[name].pid)

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each process of the pipeline, Redis and the
        PostgreSQL backends serving this database (backends that ended are not counted)."""
        used = {name: tree_cpu_seconds(proc.pid) for name, proc in self.procs.items()}
        if self.redis_pid:
            used["redis"] = cpu_seconds(self.redis_pid)
        used["postgres"] = sum(cpu_seconds(pid) for pid in postgres_backends(self.db_url))
        return used

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            stop_process(proc)
        self.procs.clear()

    # ---- the database, as the benchmark sees it
    def scalar(self, sql: str, **params: object) -> object:
        import sqlalchemy as sa

        with self._engine().connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: object) -> list[tuple[object, ...]]:
        import sqlalchemy as sa

        with self._engine().connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]

    def _engine(self):  # type: ignore[no-untyped-def]
        import sqlalchemy as sa

        if not hasattr(self, "_sa_engine"):
            self._sa_engine = sa.create_engine(self.db_url)
        return self._sa_engine

    def wait_count(
        self, sql: str, target: int, timeout: float, what: str, interval: float = 0.25
    ) -> None:
        """Poll ``sql`` (a count) until it reaches ``target``; fail if a process dies."""

        def done() -> bool:
            self._check()
            return int(self.scalar(sql) or 0) >= target  # type: ignore[call-overload]

        try:
            wait_for(done, timeout, what, interval=interval)
        except RuntimeError as exc:
            logs = "\n".join(f"--- {n}\n{self.log_tail(n, 1500)}" for n in self.procs)
            raise RuntimeError(f"{exc}\n{logs}") from exc

    def dispose(self) -> None:
        if hasattr(self, "_sa_engine"):
            self._sa_engine.dispose()


@contextlib.contextmanager
def pipeline(
    workdir: Path,
    settings: Mapping[str, str] | None = None,
    *,
    model: tuple[str, int] | None = None,
) -> Iterator[Pipeline]:
    """A migrated throw-away database, a private Redis, and (started by the caller) the
    processes; with ``model=(arch, size)`` that model is registered and active."""
    with postgres_database() as db_url, redis_server(workdir) as (redis_port, redis_pid):
        p = Pipeline(
            data_dir=workdir / "data",
            db_url=db_url,
            broker_url=f"redis://127.0.0.1:{redis_port}/0",
            port=free_port(),
            settings=dict(settings or {}),
            redis_pid=redis_pid,
        )
        p.data_dir.mkdir(parents=True, exist_ok=True)
        if model is not None:
            register_model(model[0], model[1], p.data_dir / "models", p.env)
        else:
            from thyrocad.db.engine import upgrade

            upgrade(db_url)
        try:
            yield p
        finally:
            p.stop()
            p.dispose()

"""``thyrocad demo``: the whole product on synthetic data, in a few minutes on a CPU.

synthetic studies → a quick model (if none is active) → the embedded pipeline →
a real C-STORE client → results read back from the database → the web page, with a
demo login.

The demo labeller is ``demo`` with a random password made on the first run over a data
folder, kept in ``THYROCAD_DATA_DIR/demo-login`` (mode 0600) and printed at the end of
every run. Not a fixed, documented password: the demo's data folder is the embedded
default's, ``./thyrocad-data``, and a well-known credential must not survive there into
a real installation.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thyrocad.settings import Settings

if TYPE_CHECKING:
    from thyrocad.embedded import Supervisor

logger = logging.getLogger(__name__)

DEMO_USER = "demo"
DEMO_LOGIN_FILE = "demo-login"


@dataclass(frozen=True)
class DemoRow:
    patient_id: str
    truth: str
    predicted: str
    probability: float
    images: int


def _wait_for_listener(s: Settings, deadline: float) -> None:
    from thyrocad.pacs.sender import Peer, echo

    peer = Peer("127.0.0.1", s.port, s.ae_title)
    # Refused connections while the listener starts are expected: pynetdicom would log
    # each as an ERROR.
    transport_log = logging.getLogger("pynetdicom")
    level = transport_log.level
    transport_log.setLevel(logging.CRITICAL)
    try:
        while time.monotonic() < deadline:
            try:
                if echo(peer):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
    finally:
        transport_log.setLevel(level)
    raise TimeoutError("the listener did not start in time")


def local_imagenet_weights(arch: str) -> Path | None:
    """The Keras cache's ImageNet weights file of ``arch`` on this machine, if any
    (where Keras itself looks: $KERAS_HOME/models or ~/.keras/models)."""
    from thyrocad.models.architectures import get_spec

    name = get_spec(arch).weights_file
    homes = [os.environ.get("KERAS_HOME"), str(Path.home() / ".keras")]
    for home in filter(None, homes):
        candidate = Path(home) / "models" / name
        if candidate.is_file():
            return candidate
    return None


def choose_weights(weights: str, say: Callable[[str], None]) -> str:
    """``auto``: ImageNet weights already on this machine, else a random base at once
    (no download attempt); anything else is used as given."""
    if weights != "auto":
        return weights
    if local_imagenet_weights("vgg19") is not None:
        return "imagenet"
    say(
        "ImageNet weights are not installed here: training on a randomly initialised, "
        "frozen VGG-19 base (--weights imagenet downloads them; see README, 'Offline "
        "ImageNet weights')"
    )
    return "none"


def _ensure_model(
    s: Settings,
    train: Callable[..., str],
    train_patients: int,
    input_size: int,
    epochs: int,
    say: Callable[[str], None],
    weights: str = "auto",
) -> None:
    from thyrocad.db import repository
    from thyrocad.db.engine import make_engine, make_session_factory, upgrade

    upgrade(s.db_url)
    sessions = make_session_factory(make_engine(s.db_url))
    with sessions() as session:
        if repository.active_model(session) is not None:
            say("using the active model")
            return
    from thyrocad.pacs.datasets import load_dataset
    from thyrocad.synthetic import write_synthetic_set

    train_dir = s.data_dir / "demo-train"
    say(f"writing {train_patients} synthetic training patients to {train_dir}")
    write_synthetic_set(train_dir, train_patients, seed=1, size=input_size, id_prefix="TRN")
    loaded = load_dataset(train_dir, input_size, tuple(s.classes))
    kwargs: dict[str, Any] = {
        "arch": "vgg19",
        "epochs": epochs,
        "batch_size": 32,
        "input_size": input_size,
        "seed": 0,
        "registry_dir": s.registry_dir,
        "source": str(train_dir),
    }
    chosen = choose_weights(weights, say)
    version = train(s, loaded.images, loaded.labels, loaded.patient_ids, weights=chosen, **kwargs)
    from thyrocad.worker.versions import promote_version

    promote_version(s, version, s.registry_dir)
    say(f"trained and promoted {version}")


@dataclass(frozen=True)
class DemoLogin:
    username: str
    password: str


def make_demo_login(s: Settings, username: str = DEMO_USER) -> DemoLogin:
    """The demo labeller's login: created the first time over a data folder, with a
    random password kept in ``THYROCAD_DATA_DIR/demo-login`` (mode 0600) so that a rerun
    prints the same one. The database must be migrated. ``RuntimeError`` when the user
    exists but its password is not known here (made by hand, or the file is gone), or
    someone disabled it: the demo changes neither."""
    from thyrocad.db.engine import make_engine, make_session_factory
    from thyrocad.db.repository import users
    from thyrocad.web.auth import Passwords

    kept = s.data_dir / DEMO_LOGIN_FILE
    engine = make_engine(s.db_url)
    try:
        with make_session_factory(engine).begin() as session:
            user = next((u for u in users.list_users(session) if u.username == username), None)
            if user is not None and user.disabled:
                raise RuntimeError(
                    f"the web user {username!r} is disabled here: the demo leaves it so "
                    "(thyrocad users add makes another)"
                )
            if user is not None:
                if not kept.is_file():
                    raise RuntimeError(
                        f"the web user {username!r} exists but its password is not in {kept}: "
                        "sign in with it as you know it, or use another THYROCAD_DATA_DIR"
                    )
                return DemoLogin(username, kept.read_text().strip())
            password = secrets.token_urlsafe(12)
            users.create_user(
                session, username, Passwords().hash(password), "labeller", actor="demo"
            )
            # Written before the commit: a login the database has is never lost.
            descriptor = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(password + "\n")
    finally:
        engine.dispose()
    return DemoLogin(username, password)


def web_address(s: Settings) -> str:
    """The web page's address as a browser on this machine reaches it."""
    host = "127.0.0.1" if s.web_host in ("0.0.0.0", "::", "") else s.web_host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{s.web_port}/"


def serve_again_command(s: Settings) -> str:
    """The command that serves the web page again over the demo's data."""
    script = Path(sys.executable).with_name("thyrocad")
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "thyrocad"]
    env = [f"THYROCAD_DATA_DIR={shlex.quote(str(s.data_dir.resolve()))}"]
    args = ["web", "--host", s.web_host, "--port", str(s.web_port)]
    return " ".join([*env, *map(shlex.quote, program + args)])


def web_is_up(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def run_demo(
    s: Settings,
    *,
    patients: int,
    train_patients: int,
    input_size: int,
    epochs: int,
    timeout: float,
    say: Callable[[str], None],
    train: Callable[..., str],
    weights: str = "auto",
    show: Callable[[list[DemoRow]], None] = lambda rows: None,
    out: Callable[[str], None] = lambda line: None,
    wait: bool = False,
) -> list[DemoRow]:
    """Run the demo end to end and return one row per synthetic patient.

    With the results in, ``show`` gets the rows and ``out`` the web page's address with
    the demo login; then, with ``wait``, the pipeline and the page keep running until
    Ctrl-C, and without it ``out`` gets the command that serves the page again."""
    from thyrocad.db import repository
    from thyrocad.db.engine import make_engine, make_session_factory
    from thyrocad.embedded import Supervisor
    from thyrocad.pacs.sender import Peer, iter_dicom_files, send_files
    from thyrocad.synthetic import write_synthetic_set

    s = s.model_copy(update={"study_idle_seconds": min(s.study_idle_seconds, 3.0)})
    s.data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_model(s, train, train_patients, input_size, epochs, say, weights)
    login = make_demo_login(s)
    studies_dir = s.data_dir / "demo-studies"
    cohort = write_synthetic_set(studies_dir, patients, seed=2, size=input_size, id_prefix="DEM")
    deadline = time.monotonic() + timeout
    sup = Supervisor(s, log_dir=s.data_dir / "logs")
    sup.start()
    say(f"embedded pipeline started (logs in {sup.log_dir})")
    try:
        _wait_for_listener(s, deadline)
        files = list(iter_dicom_files([studies_dir]))
        say(f"sending {len(files)} instances to {s.ae_title}@127.0.0.1:{s.port}")
        report = send_files(files, Peer("127.0.0.1", s.port, s.ae_title), "DEMO-SCU")
        if report.failed:
            raise RuntimeError(
                f"{len(report.failed)} instances were refused: {report.failed[0][1]}"
            )
        sessions = make_session_factory(make_engine(s.db_url))
        wanted = {p.patient_id: p for p in cohort}
        while True:
            _keep_running(sup)
            with sessions() as session:
                found = {
                    r.key: r
                    for r in repository.results(session)
                    if r.level == "patient" and r.key in wanted
                }
            complete = [k for k, r in found.items() if r.image_count >= len(wanted[k].paths)]
            if len(complete) == len(wanted):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(complete)}/{len(wanted)} patients finished in time")
            time.sleep(1.0)
        rows = [
            DemoRow(
                pid,
                wanted[pid].label,
                found[pid].label,
                found[pid].probability,
                found[pid].image_count,
            )
            for pid in sorted(wanted)
        ]
        show(rows)
        _offer_web_page(s, sup, login, deadline, out, wait)
    finally:
        sup.stop()
    return rows


def _keep_running(sup: Supervisor) -> None:
    """Restart a process that ended; one that keeps ending stops the demo, unless it is
    optional (the web page), which is dropped: the results still come, and the end of
    the demo says why there is no page."""
    ended = sup.poll()
    if ended is None or sup.restart(ended):
        return
    if ended not in sup.optional:
        raise RuntimeError(f"the embedded process '{ended}' keeps stopping (see its log)")
    del sup.processes[ended]


def _offer_web_page(
    s: Settings,
    sup: Supervisor,
    login: DemoLogin,
    deadline: float,
    out: Callable[[str], None],
    wait: bool,
) -> None:
    address = web_address(s)
    while "web" in sup.processes and not web_is_up(address):
        _keep_running(sup)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the web page did not answer at {address}healthz in time")
        time.sleep(0.5)
    if "web" not in sup.processes:
        log = sup.log_dir / "web.log" if sup.log_dir else "its log"
        raise RuntimeError(
            f"the web page did not start (see {log}): is port "
            f"{s.web_port} taken? THYROCAD_WEB_PORT chooses another"
        )
    out(f"Web page: {address}  — sign in as {login.username} / {login.password}")
    if wait:
        out("The pipeline and the web page run until Ctrl-C.")
        sup.wait()
    out(f"To serve the web page again over the same data: {serve_again_command(s)}")

"""A real site for the browser tests, and Debian's chromium driven by Playwright.

The site is the integration tests' (``tests/integration/site.py``): listener, an
inference worker with Grad-CAM evidence maps, the control worker and beat on a
throwaway PostgreSQL database and a private Redis. Its model is a small VGG-19 of its
own (64 px, random base, 2 epochs), evaluated so the models page has its plots: at
64 px the last convolutional block is a 4 x 4 grid whose positive-class maps are not
all zero (at the integration tests' 32 px they are, and the page would show no
evidence). One study goes in through the listener as real DICOM, and ``thyrocad
web`` serves the page over the same database and data folder. Built once per
module: it is the slow part.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from tests.db_fixtures import fresh_postgres_url, postgres_unavailable_reason
from tests.integration.conftest import cli
from tests.integration.site import Pipeline
from tests.procs import ROOT, free_port, redis_server, stop, thyrocad, wait_for
from thyrocad.pacs.sender import send_files
from thyrocad.synthetic import write_synthetic_set

if TYPE_CHECKING:
    from playwright.sync_api import Browser

# Playwright's own browser download cannot work on a hospital's (or CI's) machine:
# the tests drive the distribution's chromium (deploy/setup.sh installs it).
CHROMIUM = os.environ.get("THYROCAD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@dataclass(frozen=True)
class Account:
    username: str
    password: str
    role: str


@dataclass(frozen=True)
class Site:
    """What the tests need to know of the running site."""

    url: str  # the web page, e.g. http://127.0.0.1:PORT
    env: dict[str, str]  # what a thyrocad command needs to reach the same data
    study_id: int  # the opaque id the page uses
    study_uid: str
    patient_id: str
    images: int
    model_version: str
    evidence_peaks: dict[int, int]  # prediction id -> the stored map's peak (0-255)
    labeller: Account
    reader: Account
    web_log: Path

    def logs(self) -> str:
        return self.web_log.read_text(errors="replace")[-4000:]


def browser_unavailable_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[dev]')"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (deploy/setup.sh installs Debian's chromium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    problem = browser_unavailable_reason()
    if problem:
        pytest.skip(f"browser tests need chromium and Playwright: {problem}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """Where screenshots go: $THYROCAD_ARTIFACTS, else test-artifacts/browser/ in the repo."""
    folder = Path(os.environ.get("THYROCAD_ARTIFACTS") or ROOT / "test-artifacts" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def add_user(account: Account, env: dict[str, str]) -> None:
    """``thyrocad users add NAME --role ROLE --password-stdin``, the password on stdin."""
    done = subprocess.run(
        [sys.executable, "-m", "thyrocad", "users", "add", account.username]
        + ["--role", account.role, "--password-stdin"],
        input=account.password + "\n",
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"users add {account.username}:\n{done.stdout}\n{done.stderr}"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def train_model(tmp: Path) -> tuple[Path, str]:
    """Train, register and evaluate the site's model; return (registry, version)."""
    env = {"THYROCAD_DATA_DIR": str(tmp / "training")}
    train = tmp / "train"
    cli("synth", "--out", str(train), "--patients", "8", "--size", "64", "--seed", "5", env=env)
    registry = tmp / "registry"
    out = cli(
        *("train", "--data", str(train), "--arch", "vgg19", "--epochs", "2"),
        *("--input-size", "64", "--weights", "none", "--batch-size", "8"),
        *("--registry", str(registry)),
        env=env,
    )
    version = out.stdout.strip().splitlines()[-1].strip()
    # The ROC and precision-recall plots of the models page (training writes none).
    cli(
        *("evaluate", "--model", version, "--registry", str(registry), "--data", str(train)),
        *("--bootstrap", "100", "--out", str(registry / version / "evaluation")),
        env=env,
    )
    return registry, version


def png_peak(png: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return int(img.convert("L").getextrema()[1])


@pytest.fixture(scope="module")
def site(
    browser: Browser,  # skips before the slow part when there is no browser
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    problem = postgres_unavailable_reason()
    if problem:
        pytest.fail(f"PostgreSQL is required for the browser tests: {problem}")
    tmp = tmp_path_factory.mktemp("browser-site")
    registry, version = train_model(tmp)
    with fresh_postgres_url() as pg_url, redis_server(tmp) as (redis_port, _, _):
        port = free_port()
        env = {
            "THYROCAD_DATA_DIR": str(tmp / "data"),
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "THYROCAD_PORT": str(port),
            "THYROCAD_STUDY_IDLE_SECONDS": "1",
            "THYROCAD_EVIDENCE_MAPS": "true",
        }
        cli("db", "upgrade", env=env)
        cli("models", "promote", version, "--registry", str(registry), env=env)
        pipeline = Pipeline(env, port, tmp, sa.create_engine(pg_url))
        web: subprocess.Popen[bytes] | None = None
        try:
            pipeline.start()
            (patient,) = write_synthetic_set(tmp / "studies", 1, seed=31, size=64, id_prefix="WEB")
            report = send_files(patient.paths, pipeline.peer(), "MODALITY1")
            assert report.ok, report.failed
            images = len(patient.paths)
            labeller = Account("dr.label", "label-pass-31", "labeller")
            reader = Account("dr.read", "read-pass-31", "reader")
            for account in (labeller, reader):
                add_user(account, env)
            web_port = free_port()
            url = f"http://127.0.0.1:{web_port}"
            web_log = tmp / "web.log"
            web = thyrocad("web", "--port", str(web_port), env=env, log=web_log)
            wait_for(
                lambda: pipeline.scalar("SELECT count(*) FROM study_results_latest") == 1,
                120,
                lambda: f"the study's result ({pipeline.states()})\n{pipeline.logs()}",
            )
            wait_for(
                lambda: healthy(url),
                60,
                lambda: f"{url}/healthz\n{web_log.read_text(errors='replace')[-3000:]}",
            )
            with pipeline.engine.connect() as conn:
                study_id, study_uid = conn.execute(
                    sa.text("SELECT id, study_instance_uid FROM studies")
                ).one()
                maps = conn.execute(sa.text("SELECT prediction_id, png FROM evidence_maps"))
                peaks = {int(pid): png_peak(png) for pid, png in maps.tuples()}
            yield Site(
                url=url,
                env=env,
                study_id=int(study_id),
                study_uid=str(study_uid),
                patient_id=patient.patient_id,
                images=images,
                model_version=version,
                evidence_peaks=peaks,
                labeller=labeller,
                reader=reader,
                web_log=web_log,
            )
        finally:
            if web is not None:
                stop(web)
            for name in list(pipeline.procs):
                pipeline.kill(name)
            pipeline.engine.dispose()

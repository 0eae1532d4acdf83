"""``thyrocad demo``: the whole product on synthetic data, in a few minutes on a CPU.

synthetic studies → a quick model (if none is active) → the embedded pipeline →
a real C-STORE client → results read back from the database.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thyrocad.settings import Settings

logger = logging.getLogger(__name__)


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
) -> list[DemoRow]:
    """Run the demo end to end and return one row per synthetic patient."""
    from thyrocad.db import repository
    from thyrocad.db.engine import make_engine, make_session_factory
    from thyrocad.embedded import Supervisor
    from thyrocad.pacs.sender import Peer, iter_dicom_files, send_files
    from thyrocad.synthetic import write_synthetic_set

    s = s.model_copy(update={"study_idle_seconds": min(s.study_idle_seconds, 3.0)})
    s.data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_model(s, train, train_patients, input_size, epochs, say, weights)
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
            if (ended := sup.poll()) is not None and not sup.restart(ended):
                raise RuntimeError(f"the embedded process '{ended}' keeps stopping (see its log)")
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
    finally:
        sup.stop()
    return [
        DemoRow(
            pid, wanted[pid].label, found[pid].label, found[pid].probability, found[pid].image_count
        )
        for pid in sorted(wanted)
    ]

"""The ``thyrocad`` command line: the one place that prints to the user (with rich)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from thyrocad.logs import configure_logging
from thyrocad.settings import Settings, load_settings

app = typer.Typer(
    help="thyrocad: thyroid ultrasound classification beside a PACS.", no_args_is_help=True
)
models_app = typer.Typer(
    help="The model registry: list, show, promote, roll back.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema and roles.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")

console = Console()
err = Console(stderr=True)
logger = logging.getLogger("thyrocad")


class State:
    settings: Settings | None = None


def settings() -> Settings:
    if State.settings is None:
        State.settings = load_settings()
    return State.settings


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
    )


@app.callback()
def main_options(
    data_dir: Annotated[Path | None, typer.Option(help="Overrides THYROCAD_DATA_DIR.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        State.settings = load_settings(**overrides)
    except Exception as exc:  # pydantic's message names the bad variable
        raise fail(f"invalid settings: {exc}") from exc
    configure_logging("DEBUG" if verbose else State.settings.log_level, State.settings.log_json)


def ensure_schema(s: Settings) -> None:
    """The embedded default migrates itself; production runs 'thyrocad db upgrade'."""
    from db.engine import upgrade

    if not s.database_url:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.db_url)


def sessions(s: Settings):  # type: ignore[no-untyped-def]
    from db.engine import make_engine, make_session_factory

    ensure_schema(s)
    return make_session_factory(make_engine(s.db_url))


# --------------------------------------------------------------------------- models


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (OUT/<label>/<patient>/...).")],
    patients: Annotated[int, typer.Option(min=1)] = 10,
    seed: int = 0,
    size: Annotated[int, typer.Option(help="Tissue image size in pixels.")] = 224,
    format: Annotated[str, typer.Option(help="dicom or png")] = "dicom",
) -> None:
    """Write deterministic synthetic thyroid ultrasound studies (5 images per patient)."""
    from thyrocad.synthetic import write_synthetic_set

    try:
        written = write_synthetic_set(out, patients, seed=seed, size=size, fmt=format)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    n = sum(len(p.paths) for p in written)
    console.print(f"wrote {n} synthetic images of {len(written)} patients to {out}")


@app.command()
def train(
    data: Annotated[
        Path, typer.Option(help="Folder DIR/<class>/<patient>/<image> or CSV manifest.")
    ],
    arch: Annotated[str, typer.Option(help="vgg19 or inception_v3")] = "vgg19",
    epochs: int = 100,
    batch_size: int = 32,
    input_size: int = 224,
    weights: Annotated[
        str, typer.Option(help="imagenet, none, or a local weights file")
    ] = "imagenet",
    seed: int = 0,
    registry: Annotated[
        Path | None, typer.Option(help="Registry folder (default DATA_DIR/models).")
    ] = None,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.0,
    early_stopping: Annotated[int | None, typer.Option(help="Patience in epochs.")] = None,
    augment_variants: Annotated[int, typer.Option(help="Cached augmented copies per image.")] = 0,
    promote: Annotated[bool, typer.Option(help="Make the new version active.")] = False,
) -> None:
    """Train a model as the paper describes (patient split), evaluate it, register it."""
    from models.errors import ModelsError

    s = settings()
    try:
        version = _train(
            s,
            data,
            arch,
            epochs,
            batch_size,
            input_size,
            weights,
            seed,
            registry or s.registry_dir,
            test_fraction,
            validation_fraction,
            early_stopping,
            augment_variants,
        )
    except (ModelsError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if promote:
        _promote(s, version, registry or s.registry_dir)
    console.print(version)


def _train(
    s: Settings,
    data: Path,
    arch: str,
    epochs: int,
    batch_size: int,
    input_size: int,
    weights: str,
    seed: int,
    registry_dir: Path,
    test_fraction: float,
    validation_fraction: float,
    early_stopping: int | None,
    augment_variants: int,
) -> str:
    from models.data import discover
    from thyrocad.learning import load_images

    records = discover(data, tuple(s.classes))
    with progress() as bar:
        task = bar.add_task("decoding", total=len(records), info="")
        loaded = load_images(records, input_size, on_image=lambda: bar.advance(task))
    return train_and_register(
        s,
        loaded.images,
        loaded.labels,
        loaded.patient_ids,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        input_size=input_size,
        weights=weights,
        seed=seed,
        registry_dir=registry_dir,
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        early_stopping=early_stopping,
        augment_variants=augment_variants,
        source=str(data),
    )


def train_and_register(
    s: Settings,
    images: Any,
    labels: list[str],
    patient_ids: list[str],
    *,
    arch: str,
    epochs: int,
    batch_size: int,
    input_size: int,
    weights: str,
    seed: int,
    registry_dir: Path,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.0,
    early_stopping: int | None = None,
    augment_variants: int = 0,
    source: str = "",
) -> str:
    """Train with a progress bar, evaluate the patient-level test split, save a version."""
    from models.evaluation import evaluate, report_to_json
    from models.registry import Registry
    from models.training import TrainConfig
    from models.training import train as train_model

    config = TrainConfig(
        arch=arch,
        classes=tuple(s.classes),
        input_size=input_size,
        epochs=epochs,
        batch_size=batch_size,
        weights=None if weights == "none" else weights,
        seed=seed,
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        early_stopping_patience=early_stopping,
        augment_variants=augment_variants,
    )
    with progress() as bar:
        task = bar.add_task(f"training {arch}", total=epochs, info="")

        def on_epoch(epoch: int, logs: dict[str, float]) -> None:
            info = " ".join(f"{k}={v:.3f}" for k, v in logs.items())
            bar.update(task, completed=epoch + 1, info=info)

        result = train_model(images, labels, patient_ids, config, on_epoch=on_epoch)
    metadata = dict(result.metadata)
    metadata["source"] = source
    if len(set(result.test_labels)) >= 2:
        report = evaluate(
            result.test_labels,
            result.test_probabilities,
            result.test_patients,
            tuple(s.classes),
            positive_class=s.positive_class,
            seed=seed,
        )
        metadata["metrics"] = report_to_json(report)
        _print_metrics(metadata["metrics"])
    else:
        err.print("[yellow]test split has one class only: no metrics computed[/]")
    version = Registry(registry_dir).save(result.model, metadata)
    return version.version


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table(title=f"test split (positive class: {metrics['positive_class']})")
    table.add_column("metric")
    for level in ("image", "patient"):
        table.add_column(f"{level} (n={metrics[level]['n']})")
    for name in ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1"):
        cells = []
        for level in ("image", "patient"):
            m = metrics[level][name]
            cells.append(f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
        table.add_row(name, *cells)
    err.print(table)


@app.command()
def evaluate(
    model: Annotated[str | None, typer.Option(help="Model version in the registry.")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset folder or CSV (with --model).")] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="CSV patient_id,label,prob_<class>…")
    ] = None,
    registry: Annotated[Path | None, typer.Option()] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Write report.md/json and PNG curves here.")
    ] = None,
    positive_class: Annotated[str | None, typer.Option()] = None,
    threshold: float = 0.5,
    rule: Annotated[str, typer.Option(help="Patient rule: mean, median, max, majority.")] = "mean",
    bootstrap: int = 1000,
) -> None:
    """Image- and patient-level metrics with 95 % bootstrap intervals."""
    from models.errors import ModelsError
    from models.evaluation import (
        evaluate as run_eval,
    )
    from models.evaluation import (
        read_predictions_csv,
        report_to_json,
        write_report,
    )

    s = settings()
    try:
        if predictions is not None:
            labels, probs, patients, classes = read_predictions_csv(predictions)
        elif model is not None and data is not None:
            from models.registry import Registry
            from thyrocad.learning import load_dataset

            classifier = Registry(registry or s.registry_dir).load(model)
            loaded = load_dataset(data, classifier.input_size, classifier.classes)
            probs = _predict_all(classifier, loaded.images)
            labels, patients, classes = loaded.labels, loaded.patient_ids, classifier.classes
        else:
            raise fail("give --predictions CSV, or --model VERSION with --data")
        report = run_eval(
            labels,
            probs,
            patients,
            classes,
            positive_class=positive_class or s.positive_class
            if (positive_class or s.positive_class) in classes
            else None,
            threshold=threshold,
            patient_rule=rule,
            n_bootstrap=bootstrap,
        )
    except (ModelsError, ValueError) as exc:
        raise fail(str(exc)) from exc
    result = report_to_json(report)
    if out is not None:
        write_report(report, out)
    if json_out:
        console.print_json(json.dumps(result))
    else:
        _print_metrics(result)
        if out is not None:
            console.print(f"report written to {out}")


def _predict_all(classifier: Any, images: Any, batch: int = 32) -> Any:
    import numpy as np

    return np.concatenate(
        [classifier.predict(images[i : i + batch]) for i in range(0, len(images), batch)]
    )


@models_app.command("list")
def models_list(registry: Annotated[Path | None, typer.Option()] = None) -> None:
    """Versions on disk; the active one is marked."""
    from models.registry import Registry

    reg = Registry(registry or settings().registry_dir)
    active = reg.active()
    table = Table("version", "architecture", "input", "created", "patient AUC", "active")
    for v in reg.list():
        auc = (v.metadata.get("metrics") or {}).get("patient", {}).get("auc", {}).get("value")
        table.add_row(
            v.version,
            v.architecture,
            str(v.input_size),
            v.created_at,
            f"{auc:.3f}" if auc is not None else "-",
            "*" if active and active.version == v.version else "",
        )
    console.print(table)


@models_app.command("show")
def models_show(version: str, registry: Annotated[Path | None, typer.Option()] = None) -> None:
    """The metadata of one version."""
    from models.errors import RegistryError
    from models.registry import Registry

    try:
        v = Registry(registry or settings().registry_dir).get(version)
    except RegistryError as exc:
        raise fail(str(exc)) from exc
    console.print_json(json.dumps(v.metadata, default=str))


def _promote(s: Settings, version: str, registry_dir: Path) -> None:
    from db import repository
    from db.records import ModelVersionRecord
    from models.registry import Registry

    reg = Registry(registry_dir)
    v = reg.promote(version)
    now = dt.datetime.now(dt.UTC)
    with sessions(s).begin() as session:
        repository.upsert_model_version(
            session,
            ModelVersionRecord(
                version=v.version,
                architecture=v.architecture,
                classes=tuple(v.classes),
                input_size=v.input_size,
                artifact_path=str(v.path.resolve()),
                status="candidate",
                metrics=v.metadata.get("metrics") or {},
                created_at=now,
                promoted_at=None,
            ),
        )
        repository.set_active_model(session, v.version, now)


@models_app.command("promote")
def models_promote(version: str, registry: Annotated[Path | None, typer.Option()] = None) -> None:
    """Make VERSION the active model for the pipeline (workers pick it up without restart)."""
    from models.errors import RegistryError

    s = settings()
    try:
        _promote(s, version, registry or s.registry_dir)
    except RegistryError as exc:
        raise fail(str(exc)) from exc
    console.print(f"active model: {version}")


# --------------------------------------------------------------------------- pipeline


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the database migrations."""
    from db.engine import upgrade

    s = settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.db_url, revision)
    console.print("database at", revision)


@db_app.command("reader-role")
def db_reader_role(
    role: str = "thyrocad_reader",
    password: Annotated[str | None, typer.Option(help="LOGIN password for the role.")] = None,
) -> None:
    """Create a read-only PostgreSQL role that can query the result views only."""
    from db.engine import make_engine
    from db.roles import create_readonly_role

    try:
        for statement in create_readonly_role(make_engine(settings().db_url), role, password):
            console.print(
                statement if "PASSWORD" not in statement else "CREATE ROLE … PASSWORD '***'"
            )
    except Exception as exc:
        raise fail(str(exc)) from exc


@app.command()
def serve(
    embedded: Annotated[
        bool, typer.Option(help="Also run workers and beat as local processes.")
    ] = False,
) -> None:
    """Run the DICOM listener (with --embedded: the whole pipeline)."""
    import signal
    import threading

    s = settings()
    ensure_schema(s)
    if embedded:
        from thyrocad.embedded import Supervisor

        sup = Supervisor(s)
        sup.start()
        console.print(
            f"thyrocad embedded: {s.ae_title} on port {s.port}, data in {s.data_dir} (Ctrl-C stops)"
        )
        raise typer.Exit(sup.wait())
    from thyrocad.serve import start_service

    service = start_service(s)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated: inference,aggregation,training,maintenance")
    ] = "inference,aggregation,training,maintenance",
    pool: Annotated[str, typer.Option(help="prefork, solo or threads")] = "prefork",
    concurrency: int = 1,
    name: str = "worker",
) -> None:
    """Run a Celery worker (any number, on any machine)."""
    from worker.app import create_app

    s = settings()
    ensure_schema(s)
    celery = create_app(s)
    celery.worker_main(
        [
            "worker",
            "--queues",
            queues,
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            "--loglevel",
            s.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def beat() -> None:
    """Run the scheduler (exactly one per deployment)."""
    from worker.app import create_app

    s = settings()
    ensure_schema(s)
    celery = create_app(s)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    celery.start(
        ["beat", "--schedule", str(s.data_dir / "beat-schedule"), "--loglevel", s.log_level]
    )


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (recursed).")],
    to: Annotated[str, typer.Option(help="HOST:PORT of the receiver.")],
    aet: Annotated[str, typer.Option(help="Called AE title.")] = "THYROCAD",
    calling: Annotated[str, typer.Option(help="Our AE title.")] = "THYROCAD-SCU",
) -> None:
    """Send DICOM files with C-STORE, with a progress bar."""
    from pacs.errors import SendError
    from pacs.sender import Peer, iter_dicom_files, send_files

    try:
        peer = Peer.parse(to, aet)
        files = list(iter_dicom_files(paths))
    except (ValueError, SendError) as exc:
        raise fail(str(exc)) from exc
    with progress() as bar:
        task = bar.add_task(
            f"C-STORE → {peer.ae_title}@{peer.host}:{peer.port}", total=len(files), info=""
        )
        try:
            report = send_files(files, peer, calling, on_progress=lambda p, st: bar.advance(task))
        except SendError as exc:
            raise fail(str(exc)) from exc
    for path, reason in report.failed:
        err.print(f"[red]failed[/] {path}: {reason}")
    console.print(f"sent {len(report.sent)}, failed {len(report.failed)}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def results(
    patient: Annotated[str | None, typer.Option(help="Patient ID.")] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Latest study and patient results."""
    from db import repository

    with sessions(settings())() as session:
        rows = repository.results(session, patient_key=patient, study_uid=study)
    data = [_result_dict(r) for r in rows]
    if json_out:
        console.print_json(json.dumps(data, default=str))
        return
    table = Table(
        "level", "patient / study", "diagnosis", "probability", "images", "revision", "model"
    )
    for r in data:
        table.add_row(
            r["level"],
            r["key"],
            r["label"],
            f"{r['probability']:.3f}",
            str(r["image_count"]),
            str(r["revision"]),
            r["model_version"],
        )
    console.print(table)


def _result_dict(r: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(r)


@app.command()
def status(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Instances by state, queue depth, active model."""
    from db import repository
    from worker.app import create_app, queue_depths

    s = settings()
    with sessions(s)() as session:
        counts = repository.instance_counts(session)
        rejected = repository.rejection_counts(session)
        active = repository.active_model(session)
    try:
        depths = queue_depths(create_app(s))
    except Exception as exc:
        depths = {"error": str(exc)}  # type: ignore[dict-item]
    data = {
        "instances": counts,
        "rejections": rejected,
        "queues": depths,
        "active_model": active.version if active else None,
    }
    if json_out:
        console.print_json(json.dumps(data))
        return
    table = Table("what", "count")
    for state, n in sorted(counts.items()):
        table.add_row(f"instances {state}", str(n))
    for reason, n in sorted(rejected.items()):
        table.add_row(f"refused: {reason}", str(n))
    for q, n in depths.items():
        table.add_row(f"queue {q}", str(n))
    console.print(table)
    console.print(f"active model: {data['active_model'] or 'none'}")


@app.command()
def demo(
    patients: Annotated[
        int, typer.Option(help="Synthetic patients pushed through the pipeline.")
    ] = 8,
    train_patients: int = 40,
    input_size: Annotated[int, typer.Option(help="Model input size for the quick model.")] = 128,
    epochs: int = 30,
    timeout: float = 600.0,
) -> None:
    """Synthetic studies → quick model → embedded pipeline → C-STORE → per-patient table."""
    from thyrocad.demo import run_demo

    try:
        rows = run_demo(
            settings(),
            patients=patients,
            train_patients=train_patients,
            input_size=input_size,
            epochs=epochs,
            timeout=timeout,
            say=err.print,
            train=lambda *a, **k: train_and_register(*a, **k),
        )
    except (TimeoutError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    table = Table(
        "patient",
        "true",
        "predicted",
        "P(autoimmune)",
        "images",
        title="demo results (synthetic data)",
    )
    for row in rows:
        table.add_row(
            row.patient_id, row.truth, row.predicted, f"{row.probability:.3f}", str(row.images)
        )
    console.print(table)
    correct = sum(r.truth == r.predicted for r in rows)
    console.print(f"{correct}/{len(rows)} patients classified correctly")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

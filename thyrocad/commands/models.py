"""Model commands: synthetic data, training, evaluation, the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from thyrocad.commands.common import console, err, fail, note, progress, settings
from thyrocad.errors import UserError
from thyrocad.settings import Settings

app = typer.Typer()
models_app = typer.Typer(
    help="The model registry: list, show, promote, rollback.", no_args_is_help=True
)


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
    from thyrocad.models.errors import ModelsError

    _check_train_options(
        data, arch, epochs, batch_size, input_size, weights, test_fraction, validation_fraction
    )
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
        from thyrocad.worker.versions import promote_version

        promote_version(s, version, registry or s.registry_dir)
    console.print(version)


def _check_train_options(
    data: Path,
    arch: str,
    epochs: int,
    batch_size: int,
    input_size: int,
    weights: str,
    test_fraction: float,
    validation_fraction: float,
) -> None:
    """UserError for the first unusable option, before any image is read."""
    from thyrocad.models.architectures import ARCH_SPECS, ARCHITECTURES

    if arch not in ARCH_SPECS:
        raise UserError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    smallest = ARCH_SPECS[arch].min_input_size
    if input_size < smallest:
        raise UserError(f"--input-size {input_size} is too small: {arch} needs {smallest} or more")
    if epochs < 1 or batch_size < 1:
        raise UserError("--epochs and --batch-size are at least 1")
    if not 0 < test_fraction < 1 or not 0 <= validation_fraction < 1:
        raise UserError("--test-fraction is between 0 and 1, --validation-fraction from 0 to 1")
    if test_fraction + validation_fraction >= 1:
        raise UserError("--test-fraction plus --validation-fraction leave nothing to train on")
    if not data.exists():
        raise UserError(f"--data {data} does not exist: give a folder CLASS/PATIENT/IMAGE or a CSV")
    if data.is_file() and data.suffix.lower() != ".csv":
        raise UserError(f"--data {data} is a file but not a .csv manifest")
    if weights.lower() not in ("imagenet", "none") and not Path(weights).expanduser().is_file():
        raise UserError(f"--weights {weights}: give imagenet, none, or an existing weights file")


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
    from thyrocad.models.data import discover
    from thyrocad.pacs.datasets import load_images

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
    s: Settings, images: Any, labels: list[str], patient_ids: list[str], **options: Any
) -> str:
    """``models.registration.train_and_register`` with a per-epoch progress bar and a
    metrics table; the classes and the positive class come from the settings."""
    from thyrocad.models.registration import train_and_register as run

    epochs = int(options.get("epochs", 100))
    with progress() as bar:
        task = bar.add_task(f"training {options.get('arch', '')}", total=epochs, info="")

        def on_epoch(epoch: int, logs: dict[str, float]) -> None:
            info = " ".join(f"{k}={v:.3f}" for k, v in logs.items())
            bar.update(task, completed=epoch, info=info)

        trained = run(
            images,
            labels,
            patient_ids,
            classes=tuple(s.classes),
            positive_class=s.positive_class,
            on_epoch=on_epoch,
            **options,
        )
    if trained.metrics:
        _print_metrics(trained.metrics)
    else:
        err.print("[yellow]test split has one class only: no metrics computed[/]")
    return trained.version


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
    from thyrocad.models.errors import ModelsError
    from thyrocad.models.evaluation import evaluate as run_eval
    from thyrocad.models.evaluation_report import report_to_json, write_report
    from thyrocad.models.predictions_csv import read_predictions_csv

    s = settings()
    try:
        if predictions is not None:
            labels, probs, patients, classes = read_predictions_csv(predictions)
        elif model is not None and data is not None:
            from thyrocad.models.registry import Registry
            from thyrocad.pacs.datasets import load_dataset

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
    from thyrocad.models.registry import Registry

    root = registry or settings().registry_dir
    if not root.is_dir():  # Registry() would create it: a listing creates nothing
        raise UserError(
            f"no model registry at {root}: 'thyrocad train' registers a model there, or give "
            "--registry / THYROCAD_DATA_DIR of an existing one"
        )
    reg = Registry(root)
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
    if table.row_count:
        console.print(table)
    else:
        console.print("no model versions yet")
    note(f"registry: {root}")


@models_app.command("show")
def models_show(version: str, registry: Annotated[Path | None, typer.Option()] = None) -> None:
    """The metadata of one version."""
    from thyrocad.models.errors import RegistryError
    from thyrocad.models.registry import Registry

    try:
        v = Registry(registry or settings().registry_dir).get(version)
    except RegistryError as exc:
        raise fail(str(exc)) from exc
    console.print_json(json.dumps(v.metadata, default=str))


@models_app.command("promote")
def models_promote(version: str, registry: Annotated[Path | None, typer.Option()] = None) -> None:
    """Make VERSION the active model for the pipeline (workers pick it up without restart)."""
    from thyrocad.models.errors import RegistryError
    from thyrocad.worker.versions import promote_version

    s = settings()
    try:
        promote_version(s, version, registry or s.registry_dir)
    except RegistryError as exc:
        raise fail(str(exc)) from exc
    console.print(f"active model: {version}")

"""Evaluation: agreement with scikit-learn, bootstrap intervals, errors, report files."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from thyrocad.models.errors import EvaluationError
from thyrocad.models.evaluation import EvaluationReport, evaluate
from thyrocad.models.evaluation_report import report_to_json, write_report
from thyrocad.models.predictions_csv import read_predictions_csv, write_predictions_csv
from thyrocad.models.scoring import Level, weighted_metrics

CLASSES = ("autoimmune", "normal")
METRICS = ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1")


def make_predictions(seed, n_patients=30, images=5, ties=False):
    """Labels, probabilities and patient ids of a plausible, imperfect classifier."""
    rng = np.random.default_rng(seed)
    patient_label = rng.integers(0, 2, n_patients)
    patient_label[:2] = [0, 1]  # both classes, whatever the seed
    label_index = np.repeat(patient_label, images)
    patient_ids = [f"P{p:03d}" for p in np.repeat(np.arange(n_patients), images)]
    # A per-patient offset makes images of one patient correlated, as in real data.
    offset = np.repeat(rng.normal(0, 0.15, n_patients), images)
    p_pos = np.clip(
        0.35 + 0.3 * (label_index == 0) + offset + rng.normal(0, 0.15, offset.size), 0, 1
    )
    if ties:
        p_pos = np.round(p_pos, 1)  # many exact ties, including at the threshold
    labels = [CLASSES[i] for i in label_index]
    return labels, np.column_stack([p_pos, 1 - p_pos]), patient_ids


def sklearn_metrics(labels, scores, positive, threshold):
    """The reference: scikit-learn on the same predictions (positive vs rest)."""
    y_true = np.array([label == positive for label in labels])
    y_pred = scores >= threshold
    return {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "auc": skm.roc_auc_score(y_true, scores),
        "sensitivity": skm.recall_score(y_true, y_pred, zero_division=0),
        "specificity": skm.recall_score(y_true, y_pred, pos_label=False, zero_division=0),
        "precision": skm.precision_score(y_true, y_pred, zero_division=0),
        "f1": skm.f1_score(y_true, y_pred, zero_division=0),
    }


def assert_level_matches(level, labels, scores, positive, threshold, classes=CLASSES):
    expected = sklearn_metrics(labels, scores, positive, threshold)
    for name in METRICS:
        assert getattr(level, name).value == pytest.approx(expected[name], abs=1e-12), name
    other = next(c for c in classes if c != positive)
    predicted = [positive if s >= threshold else other for s in scores]
    np.testing.assert_array_equal(
        level.confusion, skm.confusion_matrix(labels, predicted, labels=list(classes))
    )
    assert level.n == len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("positive", "threshold"), [("autoimmune", 0.5), ("normal", 0.3)])
def test_image_level_equals_sklearn(seed, ties, positive, threshold):
    labels, probs, pids = make_predictions(seed, ties=ties)
    report = evaluate(labels, probs, pids, CLASSES, positive, threshold=threshold, n_bootstrap=100)
    column = CLASSES.index(positive)
    assert_level_matches(report.image, labels, probs[:, column], positive, threshold)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("rule", ["mean", "median", "max", "majority"])
def test_patient_level_equals_sklearn_on_aggregated_scores(seed, rule):
    labels, probs, pids = make_predictions(seed, ties=True)
    report = evaluate(labels, probs, pids, CLASSES, patient_rule=rule, n_bootstrap=100)
    first = {}
    for i, pid in enumerate(pids):
        first.setdefault(pid, []).append(i)
    scores = []
    for rows in first.values():
        p = probs[rows, 0]
        scores.append(
            {
                "mean": p.mean(),
                "median": np.median(p),
                "max": p.max(),
                "majority": np.mean(p >= 0.5),
            }[rule]
        )
    patient_labels = [labels[rows[0]] for rows in first.values()]
    assert_level_matches(report.patient, patient_labels, np.array(scores), "autoimmune", 0.5)
    assert report.patient_rule == rule


def test_zero_predicted_positives_give_precision_zero_as_sklearn():
    labels, probs, pids = make_predictions(4)
    probs = 0.01 + 0.98 * probs  # no probability reaches 1.0
    report = evaluate(labels, probs, pids, CLASSES, threshold=1.0, n_bootstrap=100)
    assert report.image.precision.value == 0.0
    assert report.image.f1.value == 0.0
    assert report.image.sensitivity.value == 0.0
    assert report.image.specificity.value == 1.0
    assert_level_matches(report.image, labels, probs[:, 0], "autoimmune", 1.0)


def test_threshold_zero_predicts_everything_positive():
    labels, probs, pids = make_predictions(5)
    report = evaluate(labels, probs, pids, CLASSES, threshold=0.0, n_bootstrap=100)
    assert report.image.sensitivity.value == 1.0
    assert report.image.specificity.value == 0.0
    assert_level_matches(report.image, labels, probs[:, 0], "autoimmune", 0.0)


def test_perfect_and_all_tied_scores():
    labels = ["autoimmune", "normal"] * 3
    pids = ["a", "b", "c", "d", "e", "f"]
    perfect = np.array([[0.9, 0.1], [0.1, 0.9]] * 3)
    assert evaluate(labels, perfect, pids, CLASSES, n_bootstrap=100).image.auc.value == 1.0
    tied = np.full((6, 2), 0.5)
    report = evaluate(labels, tied, pids, CLASSES, n_bootstrap=100)
    assert report.image.auc.value == pytest.approx(skm.roc_auc_score([1, 0] * 3, tied[:, 0]))
    assert report.image.auc.value == 0.5


def test_weighted_resample_equals_sklearn_on_the_explicit_resample():
    # The bootstrap counts how often each item is drawn instead of copying arrays; the
    # metrics of a weight row must be those of the resampled set itself.
    labels, probs, _ = make_predictions(6, n_patients=12, ties=True)
    true = np.array([CLASSES.index(x) for x in labels])
    predicted = np.where(probs[:, 0] >= 0.5, 0, 1)
    level = Level(true, predicted, probs, 0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        draw = rng.integers(0, len(labels), len(labels))
        weights = np.bincount(draw, minlength=len(labels))[None, :]
        got = weighted_metrics(level, weights)
        expected = sklearn_metrics([labels[i] for i in draw], probs[draw, 0], "autoimmune", 0.5)
        for name in METRICS:
            assert got[name][0] == pytest.approx(expected[name], abs=1e-12), name


def test_resample_with_one_class_is_skipped():
    level = Level(np.array([0, 1]), np.array([0, 1]), np.array([[0.8, 0.2], [0.3, 0.7]]), 0)
    got = weighted_metrics(level, np.array([[2, 0], [1, 1]]))
    for name in METRICS:
        assert np.isnan(got[name][0]) and not np.isnan(got[name][1])


def test_intervals_contain_the_estimate_and_are_seeded():
    labels, probs, pids = make_predictions(7, n_patients=40)
    first = evaluate(labels, probs, pids, CLASSES, n_bootstrap=300, seed=11)
    again = evaluate(labels, probs, pids, CLASSES, n_bootstrap=300, seed=11)
    other = evaluate(labels, probs, pids, CLASSES, n_bootstrap=300, seed=12)
    assert report_to_json(first) == report_to_json(again)
    assert report_to_json(first) != report_to_json(other)
    for level in (first.image, first.patient):
        for name in METRICS:
            metric = getattr(level, name)
            assert metric.ci95[0] <= metric.value <= metric.ci95[1], name
            assert 0.0 <= metric.ci95[0] < metric.ci95[1] <= 1.0, name
    assert first.bootstrap["n_bootstrap"] == 300
    assert first.bootstrap["used"] + first.bootstrap["skipped_one_class"] == 300


def test_image_level_bootstrap_resamples_patients_not_images():
    # Five identical images per patient carry no more information than one: a cluster
    # bootstrap gives the same intervals at both levels; an image bootstrap would give
    # image-level intervals about sqrt(5) times narrower.
    labels, probs, pids = make_predictions(8, n_patients=30, images=1)
    labels5 = [x for x in labels for _ in range(5)]
    probs5 = np.repeat(probs, 5, axis=0)
    pids5 = [x for x in pids for _ in range(5)]
    report = evaluate(labels5, probs5, pids5, CLASSES, n_bootstrap=200)
    for name in METRICS:
        image, patient = getattr(report.image, name), getattr(report.patient, name)
        assert image.value == pytest.approx(patient.value)
        assert image.ci95 == pytest.approx(patient.ci95)


def test_binary_per_class_table_is_consistent_and_matches_sklearn():
    labels, probs, pids = make_predictions(9, ties=True)
    report = evaluate(labels, probs, pids, CLASSES, n_bootstrap=100)
    for level, n in ((report.image, len(labels)), (report.patient, len(set(pids)))):
        a, b = level.per_class
        assert (a["class"], b["class"]) == CLASSES
        assert a["sensitivity"] == pytest.approx(b["specificity"])
        assert b["sensitivity"] == pytest.approx(a["specificity"])
        assert a["sensitivity"] == pytest.approx(level.sensitivity.value)
        assert a["specificity"] == pytest.approx(level.specificity.value)
        assert a["precision"] == pytest.approx(level.precision.value)
        assert a["f1"] == pytest.approx(level.f1.value)
        assert a["support"] + b["support"] == n
    predicted = [CLASSES[0] if p >= 0.5 else CLASSES[1] for p in probs[:, 0]]
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=list(CLASSES), zero_division=0
    )
    for i, row in enumerate(report.image.per_class):
        assert row["precision"] == pytest.approx(precision[i])
        assert row["sensitivity"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]


def test_three_classes_positive_vs_rest():
    rng = np.random.default_rng(0)
    classes = ("autoimmune", "normal", "nodular")
    n = 60
    true = np.arange(n) % 3
    logits = rng.normal(0, 1, (n, 3)) + 1.5 * np.eye(3)[true]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = [classes[i] for i in true]
    pids = [f"p{i}" for i in range(n)]
    report = evaluate(labels, probs, pids, classes, n_bootstrap=100)
    # Not positive: the most probable of the other classes.
    other = np.where(probs[:, 1] >= probs[:, 2], 1, 2)
    predicted = np.where(probs[:, 0] >= 0.5, 0, other)
    np.testing.assert_array_equal(
        report.image.confusion, skm.confusion_matrix(true, predicted, labels=[0, 1, 2])
    )
    assert report.image.accuracy.value == pytest.approx(skm.accuracy_score(true, predicted))
    assert report.image.auc.value == pytest.approx(skm.roc_auc_score(true == 0, probs[:, 0]))
    assert report.image.sensitivity.value == pytest.approx(
        skm.recall_score(true == 0, predicted == 0)
    )


def _valid():
    return make_predictions(10, n_patients=6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: (["autoimmune"] * len(a[0]), a[1], a[2], {}), "only"),
        (lambda a: (["normal"] * len(a[0]), a[1], a[2], {}), "only"),
        (lambda a: ([], np.zeros((0, 2)), [], {}), "empty"),
        (
            lambda a: (a[0], np.where(np.arange(60).reshape(30, 2) == 7, np.nan, a[1]), a[2], {}),
            "NaN",
        ),
        (lambda a: (["benign", *a[0][1:]], a[1], a[2], {}), "unknown labels"),
        (lambda a: (a[0], a[1][:, :1], a[2], {}), "shape"),
        (lambda a: (a[0][:-1], a[1], a[2], {}), "one per image"),
        (lambda a: (a[0], a[1] * 0.5, a[2], {}), "sum to 1"),
        (lambda a: (a[0], a[1] * 2 - 0.5, a[2], {}), r"\[0, 1\]"),
        (lambda a: (a[0], a[1], ["same"] * len(a[2]), {}), "different labels"),
        (lambda a: (*a, {"positive_class": "benign"}), "positive class"),
        (lambda a: (*a, {"threshold": float("nan")}), "threshold"),
        (lambda a: (*a, {"threshold": 1.5}), "threshold"),
        (lambda a: (*a, {"patient_rule": "vote"}), "patient rule"),
        (lambda a: (*a, {"n_bootstrap": 10}), "n_bootstrap"),
    ],
)
def test_degenerate_input_raises(change, message):
    labels, probs, pids, kwargs = change(_valid())
    with pytest.raises(EvaluationError, match=message):
        evaluate(labels, probs, pids, CLASSES, **{"n_bootstrap": 100, **kwargs})


def test_bad_classes_raise():
    labels, probs, pids = _valid()
    with pytest.raises(EvaluationError, match="distinct"):
        evaluate(labels, probs, pids, ("autoimmune", "autoimmune"), n_bootstrap=100)


def test_json_shape_is_exactly_the_documented_one():
    labels, probs, pids = make_predictions(11)
    data = report_to_json(evaluate(labels, probs, pids, CLASSES, n_bootstrap=100))
    assert list(data) == [
        "positive_class",
        "threshold",
        "patient_rule",
        "classes",
        "image",
        "patient",
    ]
    assert data["positive_class"] == "autoimmune"
    assert data["threshold"] == 0.5
    assert data["patient_rule"] == "mean"
    assert data["classes"] == list(CLASSES)
    for level in ("image", "patient"):
        block = data[level]
        assert list(block) == [*METRICS, "n", "confusion", "per_class"]
        for name in METRICS:
            assert list(block[name]) == ["value", "ci95"]
            assert type(block[name]["value"]) is float
            assert len(block[name]["ci95"]) == 2
            assert all(type(v) is float for v in block[name]["ci95"])
            assert 0.0 <= block[name]["value"] <= 1.0
        assert type(block["n"]) is int
        assert all(type(v) is int for row in block["confusion"] for v in row)
        assert [row["class"] for row in block["per_class"]] == list(CLASSES)
        assert set(block["per_class"][0]) == {
            "class",
            "support",
            "precision",
            "sensitivity",
            "specificity",
            "f1",
        }
    assert data["image"]["n"] == len(labels)
    assert data["patient"]["n"] == len(set(pids))
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_write_report_writes_all_files(tmp_path):
    labels, probs, pids = make_predictions(12)
    report = evaluate(labels, probs, pids, CLASSES, n_bootstrap=100)
    paths = write_report(report, tmp_path / "out", title="unit test")
    assert set(paths) == {"json", "markdown", "roc", "pr"}
    assert json.loads(paths["json"].read_text()) == report_to_json(report)
    markdown = paths["markdown"].read_text()
    for needle in (
        "# unit test",
        "| AUC-ROC |",
        "per class",
        "confusion matrix",
        "resamples of patients",
        "cluster bootstrap",
    ):
        assert needle in markdown
    for key in ("roc", "pr"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(report, EvaluationReport)


def test_predictions_csv_round_trip(tmp_path):
    labels, probs, pids = make_predictions(13)
    path = write_predictions_csv(tmp_path / "p.csv", labels, probs, pids, CLASSES)
    got_labels, got_probs, got_pids, got_classes = read_predictions_csv(path)
    assert got_labels == labels and got_pids == pids and got_classes == CLASSES
    np.testing.assert_array_equal(got_probs, probs)


def test_predictions_csv_classes_follow_header_and_extra_columns_are_ignored(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        "path,prob_normal,patient_id,prob_autoimmune,label\n"
        "a.png,0.25,P1,0.75,autoimmune\n"
        "\n"
        "b.png,0.5,P2,0.5,normal\n"
    )
    labels, probs, pids, classes = read_predictions_csv(path)
    assert classes == ("normal", "autoimmune")
    assert labels == ["autoimmune", "normal"] and pids == ["P1", "P2"]
    np.testing.assert_array_equal(probs, [[0.25, 0.75], [0.5, 0.5]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("patient_id,prob_a,prob_b\nP1,0.5,0.5\n", "needs columns"),
        ("patient_id,label,prob_a\nP1,a,1.0\n", "needs columns"),
        ("patient_id,label,prob_a,prob_b\nP1,a,0.5,abc\n", "line 2: prob_b is not a number"),
        ("patient_id,label,prob_a,prob_b\nP1,a,0.5,nan\n", "not finite"),
        ("patient_id,label,prob_a,prob_b\nP1,a,0.5\n", "3 fields"),
        ("patient_id,label,prob_a,prob_b\n,a,0.5,0.5\n", "empty patient_id"),
        ("patient_id,label,prob_a,prob_b\n", "no prediction rows"),
        ("patient_id,label,prob_a,prob_a\nP1,a,0.5,0.5\n", "duplicate"),
    ],
)
def test_bad_predictions_csv_raise(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(EvaluationError, match=message):
        read_predictions_csv(path)


def test_missing_predictions_csv_raises(tmp_path):
    with pytest.raises(EvaluationError, match="cannot read"):
        read_predictions_csv(tmp_path / "missing.csv")

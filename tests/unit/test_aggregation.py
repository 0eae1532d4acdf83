"""Rules that combine image probabilities into study or patient probabilities."""

import numpy as np
import pytest

from thyrocad.models.aggregation import RULES, combine, group_by

PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])


def test_rules_are_the_documented_four():
    assert RULES == ("mean", "median", "max", "majority")


def test_mean_and_median_per_class():
    np.testing.assert_allclose(combine(PROBS, "mean"), [0.6, 0.4])
    np.testing.assert_allclose(combine(PROBS, "median"), [0.65, 0.35])


def test_max_takes_the_most_positive_image_for_either_positive_column():
    np.testing.assert_allclose(combine(PROBS, "max", positive_index=0), [0.9, 0.1])
    np.testing.assert_allclose(combine(PROBS, "max", positive_index=1), [0.2, 0.8])


def test_majority_is_the_fraction_of_votes():
    np.testing.assert_allclose(combine(PROBS, "majority"), [0.75, 0.25])
    # With the positive class in column 1, three images vote for column 0.
    np.testing.assert_allclose(combine(PROBS, "majority", positive_index=1), [0.75, 0.25])


def test_majority_uses_the_threshold_and_a_tie_votes_positive():
    probs = np.array([[0.5, 0.5], [0.3, 0.7]])
    np.testing.assert_allclose(combine(probs, "majority"), [0.5, 0.5])
    np.testing.assert_allclose(combine(probs, "majority", threshold=0.25), [1.0, 0.0])


def test_majority_with_three_classes_votes_by_argmax():
    probs = np.array([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    np.testing.assert_allclose(combine(probs, "majority"), [0.25, 0.5, 0.25])


def test_median_with_three_classes_is_renormalised():
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6]])
    result = combine(probs, "median")
    assert result.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("rule", RULES)
def test_single_image_group_is_that_image(rule):
    single = np.array([[0.3, 0.7]])
    expected = [0.0, 1.0] if rule == "majority" else [0.3, 0.7]
    np.testing.assert_allclose(combine(single, rule), expected)


@pytest.mark.parametrize(
    ("probs", "rule", "message"),
    [
        (PROBS, "vote", "unknown aggregation rule"),
        (np.zeros((0, 2)), "mean", "empty"),
        (np.array([0.5, 0.5]), "mean", "2-D"),
        (np.array([[np.nan, 0.5]]), "mean", "NaN"),
        (np.array([[1.0]]), "mean", "at least 2"),
    ],
)
def test_bad_input_raises_value_error(probs, rule, message):
    with pytest.raises(ValueError, match=message):
        combine(probs, rule)


def test_positive_index_out_of_range():
    with pytest.raises(ValueError, match="positive_index"):
        combine(PROBS, "max", positive_index=2)


def test_group_by_keeps_first_appearance_order():
    keys = ["b", "a", "b", "c"]
    order, combined = group_by(keys, PROBS, rule="mean")
    assert order == ["b", "a", "c"]
    np.testing.assert_allclose(combined, [[0.75, 0.25], [0.2, 0.8], [0.7, 0.3]])


def test_group_by_passes_the_rule_on():
    order, combined = group_by(["x", "x", "y", "y"], PROBS, rule="max", positive_index=1)
    assert order == ["x", "y"]
    np.testing.assert_allclose(combined, [[0.2, 0.8], [0.6, 0.4]])


def test_group_by_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="one key per row"):
        group_by(["a", "b"], PROBS)
    with pytest.raises(ValueError, match="empty"):
        group_by([], np.zeros((0, 2)))

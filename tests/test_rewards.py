"""Answer extraction and checking (the reward), and the metrics built on them."""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_opd.data import Example
from lightning_opd.metrics import AnswerAccuracy, Coverage
from lightning_opd.rewards import extract_final_answer, is_correct, normalize_number


@pytest.mark.parametrize(
    "text, answer",
    [
        ("7+5=12 #### 432", "432"),
        ("#### 1\nthen #### 2  \nmore words", "2"),  # the last mark, its first line
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{a} then \\boxed{ {x}^{2} }", "{x}^{2}"),  # last box, nested braces
        ("\\boxed{7} and a cut-off \\boxed{\\frac{1", "7"),  # unbalanced: an earlier box
        ("\\boxed{3} #### 4", "4"),  # the mark wins
        ("#### \n", None),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("432", "432"),
        (" 1,234,567 ", "1234567"),
        ("$18.", "18"),
        ("+5", "5"),
        ("-$5", "-5"),
        ("-0", "0"),
        ("-0.00", "0"),
        ("3.50", "3.5"),
        (".5", "0.5"),
        ("100", "100"),
        ("1e3", "1000"),
        ("123456789012345678901234567890.10", "123456789012345678901234567890.1"),
        ("1,2", None),
        ("12,34", None),
        ("nan", None),
        ("inf", None),
        ("1_000", None),
        ("five", None),
        ("", None),
        ("-", None),
    ],
)
def test_normalize_number(raw, canonical):
    assert normalize_number(raw) == canonical


@given(
    st.decimals(
        allow_nan=False, allow_infinity=False, places=3, min_value=-(10**9), max_value=10**9
    )
)
def test_normalized_numbers_keep_their_value(value):
    text = f"{value:,f}"  # with thousands commas and the given trailing zeros
    assert Decimal(normalize_number(text)) == value


def test_number_kind_is_exact_numeric_equality():
    assert is_correct("... #### 1,000", "1000")
    assert is_correct("#### 3.50", "3.5")
    assert is_correct("#### -0", "0")
    assert is_correct("\\boxed{72}", "72")
    assert not is_correct("#### 431", "432")
    assert not is_correct("#### 1/2", "0.5")  # a fraction is not a number here
    assert not is_correct("432", "432")  # no stated final answer


@pytest.mark.parametrize(
    "response, reference",
    [
        ("#### 1/2", "0.5"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("#### 0.5", "\\frac12"),
        ("\\boxed{\\sqrt{4}}", "2"),
        ("#### 1,000", "1000"),
        ("\\boxed{x^2+1}", "1+x^2"),
    ],
)
def test_math_kind_accepts_equivalent_forms(response, reference):
    assert is_correct(response, reference, "math")


@pytest.mark.parametrize("response, reference", [("#### 1/3", "0.5"), ("\\boxed{x}", "2")])
def test_math_kind_rejects_different_values(response, reference):
    assert not is_correct(response, reference, "math")


@pytest.mark.parametrize("kind", ["number", "math"])
@pytest.mark.parametrize(
    "response, reference",
    [
        (None, "1"),
        (123, "1"),
        ("#### 1", None),
        ("#### }{", "1"),
        ("\\boxed{", "1"),
        ("#### \\frac{", "1"),
        ("#### " + "(" * 5000, "1"),
        ("#### 1", ""),
    ],
)
def test_garbage_is_wrong_and_never_raises(kind, response, reference):
    assert is_correct(response, reference, kind) is False


def test_unknown_answer_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown answer kind"):
        is_correct("#### 1", "1", "numbr")


# --------------------------------------------------------------------------- metrics


def examples(*answers: str, kind: str = "number") -> list[Example]:
    return [Example(prompt="q", answer=a, answer_kind=kind) for a in answers]


def test_answer_accuracy_counts_correct_over_total():
    metric = AnswerAccuracy()
    metric.update(["#### 1", "#### 2", "nothing"], examples("1", "3", "4"))
    metric.update(["\\boxed{\\frac{1}{2}}"], examples("0.5", kind="math"))
    assert metric.compute().item() == pytest.approx(0.5)
    assert (metric.correct.item(), metric.total.item()) == (2, 4)
    with pytest.raises(ValueError, match="2 responses"):
        metric.update(["a", "b"], examples("1"))


def test_accuracy_states_merge_by_sum_like_ranks():
    rank0, rank1 = AnswerAccuracy(), AnswerAccuracy()
    rank0.update(["#### 1"], examples("1"))
    rank1.update(["#### 0", "#### 0", "#### 2"], examples("1", "1", "2"))
    rank0.merge_state(rank1)  # what a distributed sync does with sum-reduced states
    assert rank0.compute().item() == pytest.approx(2 / 4)  # not the mean of 1 and 1/3


def test_coverage_is_supervised_over_total():
    metric = Coverage()
    metric.update(0, 0)
    assert metric.compute().item() == 0.0  # nothing to cover yet
    metric.update(3, 4)
    metric.update(torch.tensor([1, 0]), torch.tensor(4))
    assert metric.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="supervised <= total"):
        metric.update(5, 4)

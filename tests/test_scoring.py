"""The scorers of generated answers (fedlora.scoring) and multiple-choice log-likelihood arithmetic: pure, fast."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.config import load_config
from fedlora.errors import ConfigError, UserError
from fedlora.scoring import (
    SCORER_NAMES, canonical_number, exact_match, generation_scorer, label_match, normalise_answer, rouge_l,
)
from fedlora.tasks.choice_scoring import choice_metrics, closed_set


def test_exact_match_normalisation():
    assert normalise_answer("The answer is 1,000.") == "answer is 1000"
    assert normalise_answer("  An Apple_pie!\n") == "apple pie"
    assert [canonical_number(t) for t in ["3.50", "2.0", "-0.0", "0012", "1,234,567"]] == ["3.5", "2", "0", "12",
                                                                                          "1234567"]
    assert normalise_answer("3-4") == "3 4" and normalise_answer("-4 apples") == "-4 apples"
    assert exact_match("$1,000.00", "1000") == 1.0 and exact_match("The Paris.", "paris") == 1.0
    assert exact_match("1000 dollars", "1000") == 0.0 and exact_match("", "") == 0.0  # empty reference: never
    assert exact_match("12", "1.2") == 0.0 and exact_match("-3", "3") == 0.0


def test_label_match_is_the_old_prefix_match():
    assert label_match("Positive.", "positive") == 1.0 and label_match("negative review", "Negative") == 1.0
    assert label_match("not positive", "positive") == 0.0 and label_match("pos", "positive") == 0.0
    assert label_match("", "positive") == 0.0
    assert exact_match("negative review", "negative") == 0.0  # where the two scorers differ


def test_rouge_l_is_lcs_f1():
    # LCS of (cat sat on mat) = 4 words of 6 and 6: P = R = F = 2/3
    assert rouge_l("the cat sat on the mat", "a cat sat on a mat") == pytest.approx(2 / 3)
    assert rouge_l("mat on sat cat", "cat sat on mat") == pytest.approx(0.25)
    assert rouge_l("x y", "cat") == 0.0 and rouge_l("cat", "cat") == 1.0


def test_the_scorer_is_a_config_key():
    assert load_config(None, []).eval.scorer == "label-match"  # unchanged default
    assert load_config(None, ["eval.scorer=exact-match"]).eval.scorer == "exact-match"
    with pytest.raises(ConfigError, match="unknown scorer"):
        load_config(None, ["eval.scorer=bleu"])
    assert set(SCORER_NAMES) == {"label-match", "exact-match", "rouge-l", "multiple-choice"}
    with pytest.raises(UserError):
        generation_scorer("multiple-choice")  # scores log-likelihoods, not generations


def test_choice_metrics_acc_and_length_normalised_acc():
    opts = [["no", "a longer option"], ["no", "a longer option"]]
    # Example 0: "a longer option" has the lower total (-6 < -2) but the better per-character (-0.4 < -1).
    lp = [np.array([-2.0, -6.0]), np.array([-1.0, -30.0])]
    m = choice_metrics(lp, opts, ["a longer option", "no"])
    assert m == {"acc": 0.5, "acc_norm": 1.0, "outputs": ["no", "no"]}
    with pytest.raises(UserError, match="not among"):
        choice_metrics(lp, opts, ["maybe", "no"])
    assert closed_set(["b", "a", "b"]) == ["a", "b"]
    with pytest.raises(UserError, match="2..20 options"):
        closed_set(["only"] * 3)

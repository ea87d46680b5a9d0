import pytest
import torch

import math

from encore_pl.evaluation import n_gram_entropy
from encore_pl.metrics import CounterFactScores, EditScore, GenerationEntropy, OverallScore


def test_edit_score_is_mean_of_per_case_scores_in_percent():
    m = EditScore()
    m.update(torch.tensor([1.0, 0.0, 0.5]))
    m.update(torch.tensor([1.0]))
    assert m.compute().item() == 62.5  # (1 + 0 + 0.5 + 1) / 4


def test_overall_is_harmonic_mean():
    m = OverallScore()
    m.update(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    # ES 100, PS 50, NS 50: 3 / (1/100 + 1/50 + 1/50) = 60
    assert abs(m.compute().item() - 60.0) < 1e-9
    zero = OverallScore()
    zero.update(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert zero.compute().item() == 0.0


def test_counterfact_scores_together():
    s = CounterFactScores()
    s.update({"efficacy": torch.tensor([1.0, 0.0]), "paraphrase": torch.tensor([1.0, 1.0]), "neighborhood": torch.tensor([0.5, 0.5]),
              "efficacy_magnitude": torch.tensor([0.3, -0.1]), "paraphrase_magnitude": torch.tensor([0.2, 0.0]),
              "neighborhood_magnitude": torch.tensor([0.05, 0.15])})
    out = s.compute()
    assert out == pytest.approx({"efficacy_score": 50.0, "paraphrase_score": 100.0, "neighborhood_score": 50.0,
                                 "overall_score": 3 / (1 / 50 + 1 / 100 + 1 / 50), "efficacy_magnitude": 10.0,
                                 "paraphrase_magnitude": 10.0, "neighborhood_magnitude": 10.0})
    s.reset()
    assert s.compute() == {}  # nothing scored: no score, rather than 0
    # a score no request has prompts for is left out, and Overall is the harmonic mean of the others
    nan = float("nan")
    s.update({"efficacy": torch.tensor([1.0, 0.0]), "paraphrase": torch.tensor([nan, nan]), "neighborhood": torch.tensor([0.5, 1.0]),
              "efficacy_magnitude": torch.tensor([0.3, -0.1]), "paraphrase_magnitude": torch.tensor([nan, nan]),
              "neighborhood_magnitude": torch.tensor([0.05, 0.15])})
    out = s.compute()
    assert "paraphrase_score" not in out and "paraphrase_magnitude" not in out
    assert out["overall_score"] == pytest.approx(2 / (1 / 50 + 1 / 75))


def test_generation_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba, bab -> H3 = 1.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    want = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert n_gram_entropy("a b a b") == pytest.approx(want)
    assert n_gram_entropy("same same same same") == 0.0
    m = GenerationEntropy()
    m.update(torch.tensor([n_gram_entropy("a b a b"), 0.0]))
    assert m.compute().item() == pytest.approx(100 * want / 2)

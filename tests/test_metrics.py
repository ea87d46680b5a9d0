import torch

from encore_pl.metrics import CounterFactScores, EditScore, OverallScore


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
    s.update({"efficacy": torch.tensor([1.0, 0.0]), "paraphrase": torch.tensor([1.0, 1.0]), "neighborhood": torch.tensor([0.5, 0.5])})
    out = s.compute()
    assert out == {"efficacy_score": 50.0, "paraphrase_score": 100.0, "neighborhood_score": 50.0,
                   "overall_score": 3 / (1 / 50 + 1 / 100 + 1 / 50)}
    s.reset()
    assert s.compute()["efficacy_score"] == 0.0

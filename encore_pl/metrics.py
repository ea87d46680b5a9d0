"""Edit scores as torchmetrics Metrics: sum states, so they reduce correctly across processes.

Their states are made without a device on purpose: a metric is created with its module and moves
with it (tests/test_devices.py runs a fit with the meta device as default, so a metric created
later, whose states would stay on the CPU while NCCL synchronises them, fails there).
"""

import torch
from torchmetrics import Metric


class EditScore(Metric):
    """Mean of per-request values, x100: the Efficacy, Paraphrase and Neighborhood Scores (percent)
    and their magnitudes (mean P(new) - P(true), in percentage points)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor) -> None:
        """Per-request values; NaN = the request has nothing to score here (left out of the mean)."""
        scores = scores.double()
        scored = ~scores.isnan()
        self.total += scores[scored].sum().to(self.total.device)
        self.count += scored.sum().to(self.count.device)

    def compute(self) -> torch.Tensor:
        return 100.0 * self.total / self.count.clamp(min=1)


class OverallScore(Metric):
    """Harmonic mean of Efficacy, Paraphrase and Neighborhood Scores, in percent."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("totals", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, efficacy: torch.Tensor, paraphrase: torch.Tensor, neighborhood: torch.Tensor) -> None:
        """Per-request values (NaN: nothing to score, left out of that mean)."""
        stacked = torch.stack([efficacy.double(), paraphrase.double(), neighborhood.double()])
        scored = ~stacked.isnan()
        self.totals += stacked.nan_to_num(0.0).sum(1).to(self.totals.device)
        self.counts += scored.sum(1).double().to(self.counts.device)

    def compute(self) -> torch.Tensor:
        """The harmonic mean of the scores that have any request to score (0 if one of them is 0)."""
        scored = self.counts > 0
        means = 100.0 * self.totals[scored] / self.counts[scored]
        if not len(means) or (means <= 0).any():
            return torch.zeros((), dtype=torch.float64, device=means.device)
        return len(means) / (1.0 / means).sum()


class GenerationEntropy(EditScore):
    """Mean weighted 2-/3-gram entropy of generated texts, x100 (fluency, as reported in the paper)."""


SCORE_NAMES = ("efficacy", "paraphrase", "neighborhood")


class CounterFactScores(torch.nn.Module):
    """The scores of one evaluation (e.g. "pre" or "post"), updated together: ES, PS, NS, Overall,
    the three magnitudes and, when given, the three generation scores."""

    def __init__(self):
        super().__init__()
        self.scores = torch.nn.ModuleDict({name: EditScore() for name in SCORE_NAMES})
        self.magnitudes = torch.nn.ModuleDict({name: EditScore() for name in SCORE_NAMES})
        self.generation = torch.nn.ModuleDict({name: EditScore() for name in SCORE_NAMES})
        self.overall = OverallScore()

    def update(self, per_request: dict[str, torch.Tensor]) -> None:
        for name in SCORE_NAMES:
            self.scores[name].update(per_request[name])
            self.magnitudes[name].update(per_request[f"{name}_magnitude"])
            if f"generation_{name}" in per_request:
                self.generation[name].update(per_request[f"generation_{name}"])
        self.overall.update(*(per_request[name] for name in SCORE_NAMES))

    def compute(self) -> dict[str, float]:
        """Scores in percent. A score no request has prompts for (e.g. no paraphrases, or no
        generation scores) is left out, not reported as 0; the count is summed over processes
        first, so every process gives the same keys and runs the same collectives."""
        out = {}
        for group, key in ((self.scores, "{}_score"), (self.magnitudes, "{}_magnitude"), (self.generation, "generation_{}")):
            for name, m in group.items():
                with m.sync_context():
                    scored = m.count.item() > 0
                if scored:
                    out[key.format(name)] = m.compute().item()
        if "efficacy_score" in out:
            out["overall_score"] = self.overall.compute().item()
        return out

    def reset(self) -> None:
        for m in [*self.scores.values(), *self.magnitudes.values(), *self.generation.values(), self.overall]:
            m.reset()

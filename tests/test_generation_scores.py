"""Scores by the model's own greedy answer, checked against a plain greedy loop one prompt at a
time; requests without paraphrase or neighbourhood prompts are left out of those means."""

import math

import torch

from encore_pl.data import EditRequest
from encore_pl.evaluation import GENERATION_SLACK, greedy_continuations, greedy_says, score_requests, starts_with
from encore_pl.layouts import LocatedModel
from encore_pl.metrics import CounterFactScores
from encore_pl.models import load_model_and_tokenizer

PROMPTS = ["The capital city of France is", "A", "Berlin is the capital of the country called", "Paris"]


@torch.no_grad()
def greedy_by_hand(model, tok, prompt: str, steps: int) -> list[int]:
    """Argmax of the whole model on the growing sequence, no cache, no padding."""
    ids = tok(prompt).input_ids
    new = []
    for _ in range(steps):
        token = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
        new.append(token)
        if token == tok.eos_token_id:
            break
    return new


def test_batched_greedy_continuations_equal_one_prompt_at_a_time(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    steps = [4, 2, 5, 3]
    got = greedy_continuations(model, tok, PROMPTS, steps, batch_size=3)  # left-padded batches
    want = [greedy_by_hand(model, tok, p, n) for p, n in zip(PROMPTS, steps)]
    assert got == want
    assert any(len(w) == n for w, n in zip(want, steps))  # not all cut short by EOS


def test_greedy_says_whether_the_continuation_starts_with_the_target(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    lm = LocatedModel(model)
    spoken = [tok.decode(greedy_by_hand(model, tok, p, 2 + GENERATION_SLACK), skip_special_tokens=True) for p in PROMPTS]
    first_words = [s.split()[0] if s.split() else "" for s in spoken]
    pairs = [(p, " " + w.upper()) for p, w in zip(PROMPTS, first_words) if w]  # what it says, other case
    pairs += [(PROMPTS[0], " zzzz-never-said")]
    said = greedy_says(lm, tok, pairs, batch_size=2)
    assert said.tolist() == [True] * (len(pairs) - 1) + [False]


def test_starts_with_ignores_case_and_leading_space():
    assert starts_with(" paris, the city", " Paris")
    assert starts_with("PARIS", "paris ")
    assert not starts_with(" the capital is Paris", " Paris")
    assert not starts_with(" Par", " Paris")


def test_requests_without_paraphrases_or_neighbours_are_left_out_of_those_means(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    full = EditRequest("0", "France", "The capital city of {} is", " Paris", " Rome",
                       paraphrase_prompts=["France's capital is"], neighborhood_prompts=["Italy's capital is"],
                       neighborhood_target=" Rome")
    bare = EditRequest("1", "Spain", "The capital city of {} is", " Madrid", " Lisbon")
    both = score_requests(lm, tok, [full, bare], generation=True)
    alone = score_requests(lm, tok, [full], generation=True)
    for name in ("paraphrase", "neighborhood", "generation_paraphrase", "generation_neighborhood", "paraphrase_magnitude"):
        assert math.isnan(both[name][1].item()), name
        assert both[name][0].item() == alone[name][0].item(), name
    for name in ("efficacy", "generation_efficacy"):
        assert not math.isnan(both[name][1].item())
    metrics, metrics_alone = CounterFactScores(), CounterFactScores()
    metrics.update(both), metrics_alone.update(alone)
    a, b = metrics.compute(), metrics_alone.compute()
    for key in ("paraphrase_score", "neighborhood_score", "generation_paraphrase", "generation_neighborhood"):
        assert a[key] == b[key], key  # the bare request does not count as a 0
    assert set(a) >= {"generation_efficacy", "generation_paraphrase", "generation_neighborhood"}
    efficacy = [both["efficacy"][0].item(), both["efficacy"][1].item()]
    assert a["efficacy_score"] == 100 * sum(efficacy) / 2
    overall_means = [a["efficacy_score"], a["paraphrase_score"], a["neighborhood_score"]]
    if min(overall_means) > 0:
        assert abs(a["overall_score"] - 3 / sum(1 / m for m in overall_means)) < 1e-9


def test_zsre_requests_have_no_old_target(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    req = EditRequest("0", "UniFirst", "What is the product made by {}?", " uniform", "",
                      paraphrase_prompts=["What will be the product of UniFirst?"],
                      neighborhood_prompts=["who plays walter in the big lebowski?"], neighborhood_target=" John Goodman",
                      kind="zsre")
    scores = score_requests(LocatedModel(model), tok, [req], generation=True)
    assert scores["true_prob"].item() == scores["new_prob"].item()  # the edit teaches the true answer
    assert scores["efficacy_magnitude"].item() == 0.0
    assert 0.0 <= scores["efficacy"].item() <= 1.0 and 0.0 <= scores["neighborhood"].item() <= 1.0
    assert scores["generation_efficacy"].item() in (0.0, 1.0)

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
    pairs = []
    for p in PROMPTS:  # a whole word the model says first (not one cut off by the end of the text)
        words = tok.decode(greedy_by_hand(model, tok, p, 12), skip_special_tokens=True).split()
        if len(words) >= 2:
            pairs.append((p, " " + words[0].upper()))  # in another case
    assert pairs
    pairs += [(PROMPTS[0], " zzzz-never-said")]
    said = greedy_says(lm, tok, pairs, batch_size=2)
    assert said.tolist() == [True] * (len(pairs) - 1) + [False]


def test_starts_with_ignores_case_and_leading_space_but_not_word_ends():
    assert starts_with(" paris, the city", " Paris")
    assert starts_with("PARIS", "paris ")
    assert starts_with("\nRome.", " Rome")
    assert not starts_with(" the capital is Paris", " Paris")
    assert not starts_with(" Par", " Paris")
    assert not starts_with(" Romania", " Rome") and not starts_with(" 1990", " 1")


def test_the_models_own_generation_defaults_are_not_used(tiny_llama_dir):
    """A model whose generation config penalises repetition heavily still gets plain greedy answers."""
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    want = [greedy_by_hand(model, tok, p, 6) for p in PROMPTS]
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    assert greedy_continuations(model, tok, PROMPTS, 6) == want
    assert model.generation_config.repetition_penalty == 50.0  # restored


def said(model, tok, prompt: str) -> str:
    """The first word of the model's greedy continuation (what the scores should credit)."""
    text = tok.decode(greedy_by_hand(model, tok, prompt, 4), skip_special_tokens=True)
    return " " + text.split()[0]


def test_requests_without_paraphrases_or_neighbours_are_left_out_of_those_means(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    para, neighbour = "France's capital is", "Italy's capital is"
    full = EditRequest("0", "France", "The capital city of {} is", said(model, tok, para), " zzzz",
                       paraphrase_prompts=[para], neighborhood_prompts=[neighbour], neighborhood_target=said(model, tok, neighbour))
    bare = EditRequest("1", "Spain", "The capital city of {} is", " Madrid", " Lisbon")
    both = score_requests(lm, tok, [full, bare], generation=True)
    for name in ("generation_paraphrase", "generation_neighborhood"):
        assert both[name][0].item() == 1.0  # the model says these targets
    for name in ("paraphrase", "neighborhood", "generation_paraphrase", "generation_neighborhood", "paraphrase_magnitude"):
        assert math.isnan(both[name][1].item()), name
    for name in ("efficacy", "generation_efficacy"):
        assert not math.isnan(both[name][1].item())
    metrics = CounterFactScores()
    metrics.update(both)
    out = metrics.compute()
    # the bare request does not count as a 0: the means are those of the full request alone
    assert out["generation_paraphrase"] == 100.0 and out["generation_neighborhood"] == 100.0
    assert out["paraphrase_score"] == 100.0 * both["paraphrase"][0].item()
    assert out["efficacy_score"] == 100.0 * (both["efficacy"][0].item() + both["efficacy"][1].item()) / 2
    means = [out["efficacy_score"], out["paraphrase_score"], out["neighborhood_score"]]
    assert out["overall_score"] == (0.0 if min(means) == 0 else 3 / sum(1 / m for m in means))


def test_zsre_requests_have_no_old_target(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    prompt = "What is the product made by UniFirst?"
    spoken = greedy_by_hand(model, tok, prompt, 2 + GENERATION_SLACK)
    answer = tok.decode(spoken[:2])  # the model's own first two tokens: each is the top-1 after the ones before
    req = EditRequest("0", "UniFirst", "What is the product made by {}?", answer, "",
                      paraphrase_prompts=["What will be the product of UniFirst?"],
                      neighborhood_prompts=["who plays walter in the big lebowski?"], neighborhood_target=" John Goodman",
                      kind="zsre")
    scores = score_requests(LocatedModel(model), tok, [req], generation=True)
    assert scores["true_prob"].item() == scores["new_prob"].item()  # the edit teaches the true answer
    assert scores["efficacy_magnitude"].item() == 0.0
    assert scores["efficacy"].item() == 1.0  # teacher-forced token accuracy of the model's own answer
    assert scores["generation_efficacy"].item() == float(starts_with(tok.decode(spoken, skip_special_tokens=True), answer))

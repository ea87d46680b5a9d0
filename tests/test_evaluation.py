"""The scorer against a direct computation with the whole model, one prompt at a time."""

import torch

from encore_pl.data import EditRequest
from encore_pl.evaluation import score_requests, target_nll_and_accuracy
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer


def direct_nll_and_accuracy(model, tok, prompt, target):
    p = tok(prompt).input_ids
    t = tok(prompt + target).input_ids[len(p):]
    logits = model(torch.tensor([p + t])).logits[0].float()
    pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
    logp = logits[pos].log_softmax(-1)[torch.arange(len(t)), torch.tensor(t)]
    return -logp.mean().item(), (logits[pos].argmax(-1) == torch.tensor(t)).float().mean().item()


def test_batched_nll_matches_direct_computation(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    pairs = [("The capital city of France is", " Paris"), ("Berlin is in", " Germany"), ("A", " capital of Japan")]
    nll, acc = target_nll_and_accuracy(LocatedModel(model), tok, pairs, batch_size=2)
    for i, (prompt, target) in enumerate(pairs):
        want_nll, want_acc = direct_nll_and_accuracy(model, tok, prompt, target)
        assert abs(nll[i].item() - want_nll) < 1e-4
        assert abs(acc[i].item() - want_acc) < 1e-6


def test_scores_compare_new_and_true_targets(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    req = EditRequest("0", "France", "The capital city of {} is", " Paris", " Rome",
                      paraphrase_prompts=["France's capital is", "The seat of France is"],
                      neighborhood_prompts=["Italy's capital is"], neighborhood_target=" Rome")
    scores = score_requests(lm, tok, [req])
    nll = {(p, t): direct_nll_and_accuracy(model, tok, p, t)[0]
           for p in [req.filled_prompt, *req.paraphrase_prompts, *req.neighborhood_prompts] for t in (" Paris", " Rome")}
    assert scores["efficacy"].item() == float(nll[(req.filled_prompt, " Paris")] < nll[(req.filled_prompt, " Rome")])
    want_ps = sum(nll[(p, " Paris")] < nll[(p, " Rome")] for p in req.paraphrase_prompts) / 2
    assert abs(scores["paraphrase"].item() - want_ps) < 1e-6
    p = req.neighborhood_prompts[0]
    assert scores["neighborhood"].item() == float(nll[(p, " Rome")] < nll[(p, " Paris")])
    want_mag = torch.exp(torch.tensor(-nll[(req.filled_prompt, " Paris")])) - torch.exp(torch.tensor(-nll[(req.filled_prompt, " Rome")]))
    assert abs(scores["efficacy_magnitude"].item() - want_mag.item()) < 1e-5

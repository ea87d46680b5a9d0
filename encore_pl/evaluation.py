"""Scoring edit requests on the current model (METHOD.md "Evaluation").

Teacher-forced, as published: CounterFact: a target's score is its mean per-token NLL after the
prompt; an edit succeeds on a prompt when P(new) > P(true) (neighbourhood prompts: P(true) >
P(new)). zsRE: teacher-forced top-1 accuracy of the target tokens.

By the model's own answer (generation scores): the greedy continuation of a prompt, as long as
the target plus 3 tokens, must start with the new target (rewrite and paraphrase prompts) or
still start with the true object (neighbourhood prompts); case and leading space are ignored.
Teacher forcing only asks whether the target is likelier than one alternative; this asks whether
the model says it.

Every score is per request (the mean over its prompts), then the mean over requests; a request
without paraphrase or neighbourhood prompts is left out of that score's mean (NaN per request).
"""

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from tqdm.auto import tqdm

from .data import EditRequest
from .forward import pad_left, pad_right
from .layouts import LocatedModel
from .models import eos_ids
from .prompts import encode_target

GENERATION_SLACK = 3  # greedy tokens beyond the target's length


@dataclass
class EvaluationConfig:
    """When and how edits are scored.

    Args:
        final_fraction: after the last batch, score this fraction of the edited requests (a
            seeded sample); 1.0 = all of them, the paper's protocol.
        every_n_batches: retention curve: every N batches, score the requests edited so far
            (0 = off).
        retention_sample: score a seeded sample of at most this many of them (None = all).
        generation_prompts: prompts for Generation Entropy, before and after editing (0 = off).
        generation_prompts_file: a JSON list of prompts, sampled (seeded) for requests that carry
            none of their own (e.g. encore-eval/data/cf_generation_prompts.json).
        generation_length: tokens per generated text, prompt included.
        generation_scores: also score by the model's greedy answer (generation_efficacy,
            generation_paraphrase, generation_neighborhood): true in every evaluation, "final"
            only before and after editing (not the retention curve: cheaper for long runs).
        probe_file: generic text (one passage per line) for the MLP-to-residual norm ratio
            (None = built-in sentences).
        batch_size: prompts per forward pass when scoring.
    """

    final_fraction: float = 1.0
    every_n_batches: int = 0
    retention_sample: Optional[int] = None
    generation_prompts: int = 0
    generation_prompts_file: Optional[str] = None
    generation_length: int = 100
    generation_scores: Union[bool, Literal["final"]] = True
    probe_file: Optional[str] = None
    batch_size: int = 64


@torch.no_grad()
def target_nll_and_accuracy(
    lm: LocatedModel, tok, pairs: list[tuple[str, str]], batch_size: int = 64, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (prompt, target): mean NLL per target token and fraction of tokens that are argmax."""
    seqs, spans = [], []
    for prompt, target in pairs:
        p = tok(prompt).input_ids
        t = encode_target(tok, prompt, target)
        seqs.append(p + t[:-1])
        spans.append((len(p) - 1, t))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    nll = torch.zeros(len(seqs), device="cpu")  # per-pair results on the host
    acc = torch.zeros(len(seqs), device="cpu")
    device = lm.model.device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        ids, mask = pad_right([seqs[i] for i in idx], tok.pad_token_id, device)
        hidden, _ = lm.final_hidden(input_ids=ids, attention_mask=mask, use_cache=False)
        rows, cols, toks, owner = [], [], [], []
        for local, i in enumerate(idx):
            start, t = spans[i]
            for j, token in enumerate(t):
                rows.append(local), cols.append(start + j), toks.append(token), owner.append(i)
        logits = lm.logits(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).float()
        toks = torch.tensor(toks, device=device)
        token_nll = -logits.log_softmax(-1).gather(1, toks[:, None]).squeeze(1).cpu()
        token_ok = (logits.argmax(-1) == toks).float().cpu()
        owner = torch.tensor(owner, device="cpu")
        counts = torch.zeros(len(seqs), device="cpu").index_add(0, owner, torch.ones(len(owner), device="cpu"))
        nll += torch.zeros(len(seqs), device="cpu").index_add(0, owner, token_nll) / counts.clamp(min=1)
        acc += torch.zeros(len(seqs), device="cpu").index_add(0, owner, token_ok) / counts.clamp(min=1)
    return nll, acc


def _per_case(values: torch.Tensor, owners: list[int], n: int) -> torch.Tensor:
    """Mean of `values` per owner; NaN for an owner with no value."""
    owners_t = torch.tensor(owners, dtype=torch.long, device="cpu")
    total = torch.zeros(n, device="cpu").index_add(0, owners_t, values.float())
    count = torch.zeros(n, device="cpu").index_add(0, owners_t, torch.ones(len(owners), device="cpu"))
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def prompt_groups(requests: list[EditRequest]) -> dict[str, list[tuple[int, str, str, str]]]:
    """(request index, prompt, target that should win, the other target or "") per score."""
    groups = {"efficacy": [], "paraphrase": [], "neighborhood": []}
    for i, r in enumerate(requests):
        groups["efficacy"].append((i, r.filled_prompt, r.target_new, r.target_true))
        for p in r.paraphrase_prompts:
            groups["paraphrase"].append((i, p, r.target_new, r.target_true))
        for p in r.neighborhood_prompts:  # neighbours should keep their true object over the new one
            groups["neighborhood"].append((i, p, r.neighborhood_target, "" if r.kind == "zsre" else r.target_new))
    return groups


def score_requests(
    lm: LocatedModel, tok, requests: list[EditRequest], batch_size: int = 64, desc: str | None = None,
    generation: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-request scores in [0, 1] (NaN: the request has no prompt of that kind): efficacy,
    paraphrase, neighborhood, their magnitudes (mean P(new) - P(true), reversed for
    neighbourhood), P(new) and P(true) on the rewrite prompt, and with `generation` the three
    `generation_*` scores.

    CounterFact-style requests use P(new) > P(true); zsRE requests use token accuracy (their
    magnitudes are 0, and P(true) is P(new): the edit teaches the true answer). P is exp(-mean
    token NLL), as the published evaluation.
    """
    n = len(requests)
    groups = prompt_groups(requests)
    pairs, where = [], {}  # teacher-forced (prompt, target) pairs; where[name][k] = (index of keep, of other)
    for name, items in groups.items():
        where[name] = []
        for _, prompt, keep, other in items:
            where[name].append((len(pairs), len(pairs) + 1 if other else None))
            pairs += [(prompt, keep)] + ([(prompt, other)] if other else [])
    nll, acc = target_nll_and_accuracy(lm, tok, pairs, batch_size, desc)
    zsre = torch.tensor([r.kind == "zsre" for r in requests], dtype=torch.bool, device="cpu")
    out = {}
    for name, items in groups.items():
        owners = [i for i, *_ in items]
        keep_at = torch.tensor([k for k, _ in where[name]], dtype=torch.long, device="cpu")
        other_at = torch.tensor([o if o is not None else k for k, o in where[name]], dtype=torch.long, device="cpu")
        good, bad = nll[keep_at], nll[other_at]  # zsRE: no other target (bad = good, unused)
        success = _per_case((good < bad).float(), owners, n)
        accuracy = _per_case(acc[keep_at], owners, n)
        magnitude = _per_case(torch.exp(-good) - torch.exp(-bad), owners, n)
        out[name] = torch.where(zsre, accuracy, success)
        out[f"{name}_magnitude"] = torch.where(zsre & ~magnitude.isnan(), torch.zeros(n, device="cpu"), magnitude)
        if name == "efficacy":  # P(new) and P(true) on the rewrite prompt
            out["new_prob"], out["true_prob"] = torch.exp(-good), torch.exp(-bad)
    if generation:
        for name, items in groups.items():
            said = greedy_says(lm, tok, [(prompt, keep) for _, prompt, keep, _ in items], batch_size,
                               desc and f"{desc}: greedy answers ({name})")
            out[f"generation_{name}"] = _per_case(said.float(), [i for i, *_ in items], n)
    return out


@torch.no_grad()
def greedy_continuations(
    model, tok, prompts: list[str], max_new_tokens: int | list[int], batch_size: int = 64, desc: str | None = None
) -> list[list[int]]:
    """Each prompt's greedy continuation: up to `max_new_tokens` (one number, or one per prompt)
    new token ids, cut after an EOS. The prompt is tokenised as `tok(prompt)` (special tokens
    added). Prompts of similar length run together, left-padded with an attention mask; a row
    that ends early is cut after its EOS, so each continuation is what the prompt alone gives.
    Greedy and nothing else: the model's own generation defaults (sampling, penalties, suppressed
    tokens) are not used."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    steps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batched generation with")
    eos = eos_ids(model, tok)
    device = next(model.parameters()).device
    encoded = [tok(p).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), steps[i]))
    out: list[list[int]] = [[] for _ in prompts]
    was_training, model_defaults = model.training, model.generation_config
    model.eval()
    # generate() fills every setting a config leaves unset from model.generation_config: neutral ones here
    model.generation_config = GenerationConfig(pad_token_id=pad, eos_token_id=sorted(eos) or None)
    try:
        for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
            idx = order[b : b + batch_size]
            ids, mask = pad_left([encoded[i] for i in idx], pad, device)
            config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max(steps[i] for i in idx),
                                      pad_token_id=pad, eos_token_id=sorted(eos) or None)
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :].tolist()
            for row, i in enumerate(idx):
                tokens = new[row][: steps[i]]
                end = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
                out[i] = tokens[:end]
    finally:
        model.train(was_training)
        model.generation_config = model_defaults
    return out


def starts_with(text: str, target: str) -> bool:
    """Whether generated `text` starts with `target` as a whole word or more, case and leading
    space ignored: "Rome, Italy" says " Rome", "Romania" does not."""
    text, target = text.lstrip().lower(), target.strip().lower()
    return text.startswith(target) and (len(text) == len(target) or not text[len(target)].isalnum())


def greedy_says(lm: LocatedModel, tok, pairs: list[tuple[str, str]], batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """For each (prompt, target): whether the greedy continuation (target tokens + 3) starts with
    the target (bool, on the host)."""
    if not pairs:
        return torch.zeros(0, dtype=torch.bool, device="cpu")
    lengths = [len(encode_target(tok, prompt, target)) + GENERATION_SLACK for prompt, target in pairs]
    continuations = greedy_continuations(lm.model, tok, [p for p, _ in pairs], lengths, batch_size, desc)
    texts = tok.batch_decode(continuations, skip_special_tokens=True)
    return torch.tensor([starts_with(t, target) for t, (_, target) in zip(texts, pairs)], dtype=torch.bool, device="cpu")


def n_gram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """Weighted mean of the n-gram entropies (log2) of one text's words (ROME's fluency measure)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


@torch.no_grad()
def generate_texts(
    lm: LocatedModel,
    tok,
    prompts: list[str],
    length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    stride: tuple[int, int] = (0, 1),
) -> list[str]:
    """Top-k sampled continuations, `length` tokens in all (prompt included), as the published code.

    Prompts go in batches of `batch_size`, batch b sampled with seed (seed, b). `stride` = (i, k)
    generates only batches i, i + k, ...: k processes together give what one gives alone.
    """
    texts = []
    device = lm.model.device
    first, step = stride
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        if b % step != first:
            continue
        with torch.random.fork_rng(devices=[lm.model.device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1000003 + b)
            ids, mask = pad_left([tok(p).input_ids for p in prompts[start : start + batch_size]], tok.pad_token_id, device)
            width = ids.shape[1]
            out = lm.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k, top_p=1.0,
                temperature=1.0, max_new_tokens=max(1, length - width), pad_token_id=tok.pad_token_id,
            )
            texts += tok.batch_decode(out, skip_special_tokens=True)
    return texts

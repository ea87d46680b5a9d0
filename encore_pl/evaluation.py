"""Scoring edit requests on the current model (teacher forcing, METHOD.md "Evaluation").

CounterFact: a target's score is its mean per-token NLL after the prompt; an edit succeeds on a
prompt when P(new) > P(true) (neighbourhood prompts: P(true) > P(new)).
zsRE: teacher-forced top-1 accuracy of the target tokens.
"""

import math
import re
from collections import Counter

import torch
from tqdm.auto import tqdm

from .data import EditRequest
from .keys import pad_right
from .layouts import LocatedModel
from .prompts import encode_target


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
    owners_t = torch.tensor(owners, dtype=torch.long, device="cpu")
    total = torch.zeros(n, device="cpu").index_add(0, owners_t, values.float())
    count = torch.zeros(n, device="cpu").index_add(0, owners_t, torch.ones(len(owners), device="cpu"))
    return total / count.clamp(min=1)


def score_requests(
    lm: LocatedModel, tok, requests: list[EditRequest], batch_size: int = 64, desc: str | None = None
) -> dict[str, torch.Tensor]:
    """Per-request scores in [0, 1]: efficacy, paraphrase, neighborhood, their magnitudes
    (mean P(new) - P(true), reversed for neighbourhood), and P(new), P(true) on the rewrite prompt.

    CounterFact-style requests use P(new) > P(true); zsRE requests use token accuracy (their
    magnitudes are 0). P is exp(-mean token NLL), as the published evaluation.
    """
    n = len(requests)
    groups = {"efficacy": [], "paraphrase": [], "neighborhood": []}
    for i, r in enumerate(requests):
        groups["efficacy"].append((i, r.filled_prompt, r.target_new, r.target_true))
        for p in r.paraphrase_prompts:
            groups["paraphrase"].append((i, p, r.target_new, r.target_true))
        for p in r.neighborhood_prompts:
            # counterfact: neighbours should keep the true object over the new one
            groups["neighborhood"].append((i, p, r.neighborhood_target, r.target_new))
    pairs, where = [], {}
    for name, items in groups.items():
        where[name] = len(pairs)
        for _, prompt, keep, other in items:
            pairs += [(prompt, keep), (prompt, other)]
    nll, acc = target_nll_and_accuracy(lm, tok, pairs, batch_size, desc)
    zsre = torch.tensor([r.kind == "zsre" for r in requests], dtype=torch.bool, device="cpu")
    out = {}
    for name, items in groups.items():
        owners = [i for i, *_ in items]
        start, m = where[name], len(items)
        good, bad = nll[start : start + 2 * m : 2], nll[start + 1 : start + 2 * m : 2]
        success = _per_case((good < bad).float(), owners, n)
        accuracy = _per_case(acc[start : start + 2 * m : 2], owners, n)
        magnitude = _per_case(torch.exp(-good) - torch.exp(-bad), owners, n)
        out[name] = torch.where(zsre, accuracy, success)
        out[f"{name}_magnitude"] = torch.where(zsre, torch.zeros(n, device="cpu"), magnitude)
        if name == "efficacy":  # P(new) and P(true) on the rewrite prompt
            out["new_prob"], out["true_prob"] = torch.exp(-good), torch.exp(-bad)
    return out


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
            chunk = [tok(p).input_ids for p in prompts[start : start + batch_size]]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long, device="cpu")
            mask = torch.zeros_like(ids)
            for i, c in enumerate(chunk):  # left padding for generation
                ids[i, width - len(c) :] = torch.tensor(c, device="cpu")
                mask[i, width - len(c) :] = 1
            out = lm.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, top_k=top_k, top_p=1.0,
                temperature=1.0, max_new_tokens=max(1, length - width), pad_token_id=tok.pad_token_id,
            )
            texts += tok.batch_decode(out, skip_special_tokens=True)
    return texts

"""Step 1 of METHOD.md: target vectors z with MPES, all requests of a batch optimised together.

For each request, `delta` is added to the output of layer `z_layer` at the subject's last token of
the bare rewrite prompt, the context-prefixed rewrite prompts and the essence prompt "{} is a".
Everything before the subject's last token does not depend on delta: it is run once and kept as
a key/value cache; each step runs only the positions from the subject's last token on, and
projects to the vocabulary only where a target token or the essence distribution is read.

Each request keeps its own stopping state. Adam is element-wise and every request starts at the
same step, so optimising the rows of one [n, d] tensor with one Adam is the same as n separate
optimisations; a request that has stopped leaves the forward pass and its z is frozen.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache

from .data import EditRequest
from .keys import block_output, pad_right
from .layouts import LocatedModel
from .prompts import encode


@dataclass
class TargetOptimization:
    """Hyperparameters of the z optimisation (names as in the published code).

    Args:
        v_lr: Adam learning rate on delta.
        v_num_grad_steps: at most this many forward passes (so at most one fewer Adam step).
        v_weight_decay: weight of ||delta|| / ||h||^2 in the loss.
        clamp_norm_factor: ||delta|| is clamped to this fraction of ||h|| after every step.
        kl_factor: weight of KL(p_current || p_initial) on the essence prompt.
        extra_steps: MPES: stop once the new target is the argmax everywhere on 1 + extra_steps
            checks. None turns MPES off (plain MEMIT / AlphaEdit).
        nll_stop: stop when the request's total loss falls below this.
    """

    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    extra_steps: Optional[int] = 1
    nll_stop: float = 0.05


@dataclass
class TargetVectors:
    z: torch.Tensor  # [n, d] the target output of layer z_layer at the subject's last token
    h: torch.Tensor  # [n, d] the output before optimisation
    steps: torch.Tensor  # [n] Adam steps taken
    target_prob: torch.Tensor  # [n] mean probability of the new target when optimisation stopped


@dataclass
class _Rows:
    """The tokenised prompts of a batch, one row per prompt, split at the subject's last token."""

    request: torch.Tensor  # [rows] which request
    kind: torch.Tensor  # [rows] 0 bare rewrite, 1 prefixed rewrite, 2 essence
    prefix: list[list[int]]
    suffix: list[list[int]]
    targets: list[list[tuple[int, int]]]  # (position in suffix, token) per rewrite row


def prefixed_targets_top1(
    correct: torch.Tensor, token_row: torch.Tensor, row_request: torch.Tensor, row_kind: torch.Tensor, n: int
) -> torch.Tensor:
    """Per request: is every target token of every context-prefixed prompt the argmax? [n] bool.

    `correct` [tokens] says whether each target token is the argmax at its position, `token_row`
    [tokens] which row it belongs to; rows have a request and a kind (1 = prefixed rewrite).
    All positions count, so a multi-token target qualifies only when all its tokens are top-1.
    """
    wrong_in_row = torch.zeros(len(row_request), device=correct.device).index_add(0, token_row, (~correct).float())
    bad_row = (row_kind == 1) & (wrong_in_row > 0)
    bad = torch.zeros(n, device=correct.device).index_add(0, row_request, bad_row.float())
    return bad == 0


class MostProbableEarlyStopping:
    """MPES: stop a request once it has qualified on 1 + extra_steps checks (not necessarily in a row)."""

    def __init__(self, n: int, extra_steps: Optional[int]):
        self.extra_steps = extra_steps
        self.hits = torch.zeros(n, dtype=torch.long)

    def update(self, qualifies: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Count this check for the active requests; return which of them stop now."""
        if self.extra_steps is None:
            return torch.zeros_like(active)
        self.hits += (qualifies & active).long()
        return active & qualifies & (self.hits == 1 + self.extra_steps)


def _build_rows(tok, requests: list[EditRequest], prefixes: list[str]) -> _Rows:
    request, kind, prefix, suffix, targets = [], [], [], [], []
    for i, r in enumerate(requests):
        prompts = [encode(tok, r.prompt, r.subject, prefix=c, target=r.target_new) for c in [""] + prefixes]
        prompts.append(encode(tok, "{} is a", r.subject))
        for j, e in enumerate(prompts):
            s = e.subject_last
            request.append(i)
            kind.append(0 if j == 0 else 1 if j <= len(prefixes) else 2)
            prefix.append(e.ids[:s])
            suffix.append(e.ids[s:])
            targets.append([(p - s, t) for p, t in zip(e.target_positions(), e.target_ids)])
    return _Rows(torch.tensor(request), torch.tensor(kind), prefix, suffix, targets)


def _prefix_cache(lm: LocatedModel, prefix: list[list[int]], pad_id: int):
    """Run the left-padded prefixes once; return per-layer (key, value) tensors and the mask."""
    device = lm.model.device
    width = max(len(p) for p in prefix)
    ids = torch.full((len(prefix), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefix), width), dtype=torch.long)
    for i, p in enumerate(prefix):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    if width == 0:
        return None, mask
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        _, cache = lm.final_hidden(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return kv, mask


def compute_target_vectors(
    lm: LocatedModel,
    tok,
    requests: list[EditRequest],
    prefixes: list[str],
    z_layer: int,
    hp: TargetOptimization,
) -> TargetVectors:
    """Optimise delta for every request of the batch together; return z = h + delta and stats."""
    device = lm.model.device
    rows = _build_rows(tok, requests, prefixes)
    n, d = len(requests), lm.model.config.hidden_size
    kv, prefix_mask = _prefix_cache(lm, rows.prefix, tok.pad_token_id)
    prefix_len = prefix_mask.sum(1)

    delta = torch.zeros((n, d), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    h = torch.zeros((n, d), device=device)
    kl_init = torch.zeros((n, lm.model.config.vocab_size), device=device)
    z = torch.zeros((n, d), device=device)
    steps = torch.zeros(n, dtype=torch.long)
    target_prob = torch.zeros(n)
    mpes = MostProbableEarlyStopping(n, hp.extra_steps)
    active = torch.ones(n, dtype=torch.bool)
    edit_block = lm.block(z_layer)

    for it in range(hp.v_num_grad_steps):
        row_idx = torch.nonzero(active[rows.request]).squeeze(1)
        req_of_row = rows.request[row_idx].to(device)
        suffix_ids, suffix_mask = pad_right([rows.suffix[r] for r in row_idx], tok.pad_token_id, device)
        mask = torch.cat([prefix_mask[row_idx], suffix_mask], dim=1)
        pos = prefix_len[row_idx, None] + torch.arange(suffix_ids.shape[1], device=device)
        cache = None
        if kv is not None:
            cache = DynamicCache(ddp_cache_data=[(k[row_idx], v[row_idx]) for k, v in kv], config=lm.model.config)
        first = it == 0

        def add_delta(module, args, output):
            hidden = block_output(output)
            if first:
                bare = (rows.kind[row_idx] == 0).to(device)
                h[req_of_row[bare]] = hidden[bare, 0].detach().float()
            col0 = hidden[:, 0] + delta[req_of_row].to(hidden.dtype)
            hidden = torch.cat([col0[:, None], hidden[:, 1:]], dim=1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = edit_block.register_forward_hook(add_delta)
        try:
            hidden, _ = lm.final_hidden(
                input_ids=suffix_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
        finally:
            handle.remove()

        # Gather the positions that are read: target tokens of rewrite rows, column 0 of essence rows.
        t_row, t_col, t_tok = [], [], []
        for local, r in enumerate(row_idx.tolist()):
            for col, token in rows.targets[r]:
                t_row.append(local), t_col.append(col), t_tok.append(token)
        t_row = torch.tensor(t_row, device=device)
        t_tok = torch.tensor(t_tok, device=device)
        logits = lm.logits(hidden[t_row, torch.tensor(t_col, device=device)]).float()
        logp = logits.log_softmax(-1)
        token_logp = logp.gather(1, t_tok[:, None]).squeeze(1)
        correct = logits.argmax(-1) == t_tok

        # NLL per rewrite row: -sum log p(target) / number of target tokens; mean per request.
        n_rows = len(row_idx)
        row_nll = torch.zeros(n_rows, device=device).index_add(0, t_row, -token_logp)
        n_tok = torch.zeros(n_rows, device=device).index_add(0, t_row, torch.ones_like(token_logp))
        kinds = rows.kind[row_idx].to(device)
        rewrite = kinds < 2
        row_nll = torch.where(rewrite, row_nll / n_tok.clamp(min=1), torch.zeros_like(row_nll))
        per_req = lambda x: torch.zeros(n, device=device).index_add(0, req_of_row, x)  # noqa: E731
        nll = per_req(row_nll) / per_req(rewrite.float()).clamp(min=1)

        essence = torch.nonzero(kinds == 2).squeeze(1)
        ess_req = req_of_row[essence]
        ess_logp = lm.logits(hidden[essence, 0]).float().log_softmax(-1)
        if first:
            kl_init[ess_req] = ess_logp.detach()
        kl = torch.zeros(n, device=device)
        kl[ess_req] = hp.kl_factor * (ess_logp.exp() * (ess_logp - kl_init[ess_req])).sum(-1)
        decay = hp.v_weight_decay * delta.norm(dim=1) / h.norm(dim=1).clamp(min=1e-12) ** 2
        loss = nll + kl + decay

        qualifies = prefixed_targets_top1(correct, t_row, req_of_row, kinds, n)
        stop = mpes.update(qualifies.cpu(), active)
        for i in torch.nonzero(active & ~stop).squeeze(1).tolist():
            if loss[i].item() < hp.nll_stop or it == hp.v_num_grad_steps - 1:
                stop[i] = True
        if stop.any():
            idx = torch.nonzero(stop).squeeze(1)
            z[idx] = (h[idx] + delta[idx]).detach()
            steps[idx] = it
            row_prob = torch.where(rewrite, torch.exp(-row_nll.detach()), torch.zeros_like(row_nll))
            target_prob[idx] = (per_req(row_prob) / per_req(rewrite.float()).clamp(min=1))[idx].cpu()
            active &= ~stop
        if not active.any():
            break

        opt.zero_grad()
        loss[active.to(device)].sum().backward()
        opt.step()
        with torch.no_grad():  # project delta into the ball of radius clamp_norm_factor * ||h||
            max_norm = hp.clamp_norm_factor * h.norm(dim=1, keepdim=True)
            norm = delta.norm(dim=1, keepdim=True)
            delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))
    return TargetVectors(z=z, h=h, steps=steps, target_prob=target_prob)

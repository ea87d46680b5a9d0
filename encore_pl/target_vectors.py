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

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
from transformers import DynamicCache

from .data import EditRequest
from .forward import Replay, StopForward, block_output, pad_left, pad_right, replayed
from .layouts import LocatedModel
from .models import reduced_copy
from .prompts import common_prefix, encode


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
        batched: optimise all requests of a batch together, computing only what delta changes.
            False: the published loop (one request at a time, whole model, full vocabulary), the
            reference for checks and benchmarks; same results, several times slower.
        chunk_size: optimise at most this many requests together (None: a process's whole share
            of the edit batch). Requests are independent, so the results do not change; memory
            falls with the chunk (e.g. Llama3-8B at batch 100 on a 24 GB GPU).
        compute_dtype: the dtype of the optimisation's steps (None: the model's): the blocks after z_layer and the
            vocabulary head run in a copy of those weights in this dtype, made once per run
            ("bfloat16": about twice the matmul rate of float32 on recent CPUs and GPUs; the
            copy costs the size of those weights in bfloat16). delta, the losses, Adam and the
            clamp stay float32; the prompts' fixed parts (prefix cache, blocks up to z_layer),
            keys, C0 and the solves keep the model's dtype. Only the batched path uses it.
    """

    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    extra_steps: Optional[int] = 1
    nll_stop: float = 0.05
    batched: bool = True
    chunk_size: Optional[int] = None
    compute_dtype: Optional[Literal["float32", "bfloat16"]] = None


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
    context: list[int]  # [rows] which context prefix (-1: none)
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
        self.hits = torch.zeros(n, dtype=torch.long, device="cpu")  # host: read every step

    def update(self, qualifies: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Count this check for the active requests; return which of them stop now."""
        if self.extra_steps is None:
            return torch.zeros_like(active)
        self.hits += (qualifies & active).long()
        return active & qualifies & (self.hits == 1 + self.extra_steps)


def build_rows(tok, requests: list[EditRequest], prefixes: list[str]) -> _Rows:
    request, kind, context, prefix, suffix, targets = [], [], [], [], [], []
    for i, r in enumerate(requests):
        prompts = [encode(tok, r.prompt, r.subject, prefix=c, target=r.target_new) for c in [""] + prefixes]
        prompts.append(encode(tok, "{} is a", r.subject))
        for j, e in enumerate(prompts):
            s = e.subject_last
            request.append(i)
            kind.append(0 if j == 0 else 1 if j <= len(prefixes) else 2)
            context.append(j - 1 if 1 <= j <= len(prefixes) else -1)
            prefix.append(e.ids[:s])
            suffix.append(e.ids[s:])
            targets.append([(p - s, t) for p, t in zip(e.target_positions(), e.target_ids)])
    return _Rows(torch.tensor(request, device="cpu"), torch.tensor(kind, device="cpu"), context, prefix, suffix, targets)


class SuffixForward:
    """The forward pass of the positions that see delta; everything else is computed once.

    Rows are prompts split at the subject's last token into `prefix` and `suffix` (from that token
    on). Prefixes run once into a key/value cache; the tokens that all rows of a group share (a
    context prefix) run once per group. Suffixes run once through blocks 0..z_layer, where nothing
    depends on delta, keeping the output of block z_layer. A call adds delta at suffix position 0
    and runs only blocks z_layer+1.. on the suffix positions, rows of equal suffix length together
    (no padding).
    """

    def __init__(
        self,
        lm: LocatedModel,
        prefix: list[list[int]],
        suffix: list[list[int]],
        z_layer: int,
        pad_id: int,
        groups: Optional[list[int]] = None,
        steps_lm: Optional[LocatedModel] = None,
    ):
        self.lm, self.z_layer = lm, z_layer
        device = lm.model.device
        self.suffix_ids, self.suffix_mask = pad_right(suffix, pad_id, device)
        self.suffix_len = self.suffix_mask.sum(1)
        self.kv, self.prefix_mask = self._prefix_cache(prefix, groups or [-1] * len(prefix), pad_id)
        self.prefix_len = self.prefix_mask.sum(1)

        captured = {}

        def keep(module, args, output):
            captured["out"], captured["arity"] = block_output(output), len(output) if isinstance(output, tuple) else 0
            raise StopForward

        handle = lm.block(z_layer).register_forward_hook(keep)
        try:
            with torch.no_grad():
                lm.final_hidden(**self._inputs(torch.arange(len(suffix), device=device), self.kv))
        except StopForward:
            pass
        finally:
            handle.remove()
        self.fixed, self.arity = captured["out"], captured["arity"]  # [rows, width, d] out of block z_layer
        if self.kv is not None:  # the replayed blocks 0..z_layer never read their caches again
            self.kv = self.kv[:1] + [None] * self.z_layer + self.kv[self.z_layer + 1 :]
        self.h = self.fixed[:, 0].float()  # before delta, at the subject's last token
        # The steps run in `steps_lm` (a reduced-precision copy of the later blocks and the head):
        # what they read of the fixed parts is converted once here.
        self.steps_lm = steps_lm or lm
        dtype = next(self.steps_lm.model.parameters()).dtype
        self.fixed_rest = self.fixed.to(dtype)
        if self.kv is not None and dtype != self.fixed.dtype:  # layer by layer: one layer's copy at a time
            for i, kv in enumerate(self.kv):
                self.kv[i] = None if kv is None else (kv[0].to(dtype), kv[1].to(dtype))
        self._selected: dict[tuple, list] = {}

    def _prefix_cache(self, prefix: list[list[int]], groups: list[int], pad_id: int):
        """Key/value tensors per layer [rows, heads, width, d_head] of the prefixes, and their mask."""
        lm, device = self.lm, self.suffix_ids.device
        names = sorted(set(g for g in groups if g >= 0))
        shared = [common_prefix([p for p, g in zip(prefix, groups) if g == name]) for name in names]
        slot = {name: i for i, name in enumerate(names)}
        n_shared = [len(shared[slot[g]]) if g >= 0 else 0 for g in groups]
        own = [p[k:] for p, k in zip(prefix, n_shared)]
        if not any(own) and not any(shared):
            return None, torch.zeros((len(prefix), 0), dtype=torch.long, device=device)
        cache, shared_mask = None, torch.zeros((len(prefix), 0), dtype=torch.long, device=device)
        if any(shared):  # the shared tokens of each group, once
            ids, mask = pad_left(shared, pad_id, device)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():
                _, group_cache = lm.final_hidden(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            which = torch.tensor([slot.get(g, 0) for g in groups], device=device)
            in_group = torch.tensor([g >= 0 for g in groups], device=device)
            shared_mask = mask[which] * in_group[:, None]
            cache = [(layer.keys[which], layer.values[which]) for layer in group_cache.layers]
        ids, mask = pad_left(own, pad_id, device)
        if ids.shape[1] == 0:
            return cache, shared_mask
        full_mask = torch.cat([shared_mask, mask], dim=1)
        pos = shared_mask.sum(1, keepdim=True) + (mask.cumsum(1) - 1).clamp(min=0)
        past = None if cache is None else DynamicCache(ddp_cache_data=cache, config=lm.model.config)
        with torch.no_grad():
            _, own_cache = lm.final_hidden(input_ids=ids, attention_mask=full_mask, position_ids=pos,
                                           past_key_values=past, use_cache=True)
        return [(layer.keys, layer.values) for layer in own_cache.layers], full_mask

    def _inputs(self, rows: torch.Tensor, kv) -> dict:
        width = int(self.suffix_len[rows].max())
        device = self.suffix_ids.device
        cache = None if kv is None else DynamicCache(ddp_cache_data=kv, config=self.lm.model.config)
        return dict(
            input_ids=self.suffix_ids[rows, :width],
            attention_mask=torch.cat([self.prefix_mask[rows], self.suffix_mask[rows, :width]], dim=1),
            position_ids=self.prefix_len[rows, None] + torch.arange(width, device=device),
            past_key_values=cache,
            use_cache=cache is not None,
        )

    def _cache_for(self, rows: torch.Tensor, kept: dict) -> Optional[list]:
        """The prefix cache of `rows` (reused while the same rows stay together)."""
        if self.kv is None:
            return None
        key = tuple(rows.tolist())
        if key not in self._selected:  # replaced blocks never read theirs: only layer 0's length is used
            first = (self.kv[0][0][rows], self.kv[0][1][rows])
            self._selected[key] = [first] * (self.z_layer + 1) + [(k[rows], v[rows]) for k, v in self.kv[self.z_layer + 1 :]]
        kept[key] = self._selected[key]
        return kept[key]

    def __call__(self, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states [len(rows), width, d], with delta [len(rows), d] added at position 0.

        Positions past a row's suffix length are zero.
        """
        lengths = self.suffix_len[rows]
        width = int(lengths.max())
        hidden, kept = None, {}
        with replayed(self.steps_lm, self.z_layer, self.arity) as stand_in:
            for length in lengths.unique().tolist():
                local = torch.nonzero(lengths == length).squeeze(1)
                sub = rows[local]
                rest = self.fixed_rest[sub, 1:length]
                first = self.fixed[sub, 0].float() + delta[local]  # delta added in float32
                stand_in.output = torch.cat([first.to(rest.dtype)[:, None], rest], dim=1)
                out, _ = self.steps_lm.final_hidden(**self._inputs(sub, self._cache_for(sub, kept)))
                if hidden is None:
                    hidden = out.new_zeros((len(rows), width, out.shape[-1]))
                hidden[local, :length] = out
        self._selected = kept
        return hidden


def step_model(lm: LocatedModel, z_layer: int, dtype: torch.dtype) -> LocatedModel:
    """A copy of the model in `dtype` for the z optimisation's steps. Only what the steps run is
    copied: the blocks after z_layer, the final norm, the head and the embeddings (whose dtype
    sets the forward's); blocks 0..z_layer are replayed by the steps, so their copies are empty
    stand-ins. The blocks after z_layer are never edited (z_layer >= the last edited layer), so
    one copy serves the whole run."""
    memo = {id(lm.blocks[i]): Replay(0) for i in range(z_layer + 1)}  # deepcopy takes these as the copies
    model = reduced_copy(lm.model, dtype, memo)
    if lm.model.device.type == "cpu" and hasattr(model, "set_attn_implementation"):
        # On CPU, SDPA's backward in bfloat16 is slow: for 25 requests of SmolLM2 the steps took
        # 42.5 s with it and 26.6 s with eager attention (float32 SDPA: 53.1 s). GPUs keep SDPA.
        model.set_attn_implementation("eager")
    return LocatedModel(model)


@dataclass
class _Step:
    """What one step of the z optimisation runs and reads, for the rows of the active requests."""

    rows: torch.Tensor  # [r] the active rows
    request: torch.Tensor  # [r] their request
    kind: torch.Tensor  # [r] their kind (0 bare, 1 prefixed, 2 essence)
    token_row: torch.Tensor  # [t] local row (index into `rows`) of each read target token
    token_col: torch.Tensor  # [t] its position in the row's suffix
    token_id: torch.Tensor  # [t] the target token


class ReadPositions:
    """The target tokens read in each row, as flat index tensors built once per batch; a step
    selects those of its active rows with a mask (no Python loop over rows or tokens)."""

    def __init__(self, rows: _Rows, device: torch.device):
        flat = [(r, col, token) for r, targets in enumerate(rows.targets) for col, token in targets]
        row, col, token = zip(*flat) if flat else ((), (), ())
        self.row = torch.tensor(row, dtype=torch.long, device=device)
        self.col = torch.tensor(col, dtype=torch.long, device=device)
        self.token = torch.tensor(token, dtype=torch.long, device=device)
        self.request = rows.request.to(device)
        self.kind = rows.kind.to(device)

    def select(self, active_requests: torch.Tensor) -> _Step:
        on = active_requests[self.request]  # [rows]
        rows = torch.nonzero(on).squeeze(1)
        local = torch.cumsum(on.long(), 0) - 1  # a row's index among the active rows
        read = on[self.row]
        return _Step(rows, self.request[rows], self.kind[rows], local[self.row[read]], self.col[read], self.token[read])


@dataclass
class _Losses:
    loss: torch.Tensor  # [n] NLL + KL + decay per request (inactive requests: not meaningful)
    qualifies: torch.Tensor  # [n] bool: every target token of every prefixed row is the argmax
    target_prob: torch.Tensor  # [n] mean over rewrite rows of exp(-NLL per token), detached


def _losses(lm: LocatedModel, hidden: torch.Tensor, step: _Step, delta: torch.Tensor, h: torch.Tensor,
            kl_init: torch.Tensor, first: bool, hp: TargetOptimization, n: int) -> _Losses:
    """The loss of each request from the final hidden states of its active rows (METHOD.md step 1).

    NLL per rewrite row: -sum log p(target) / number of target tokens, mean over the request's
    rewrite rows; KL(p || p_init) on the essence row's subject token (p_init taken at the first
    step, into `kl_init`); decay ||delta|| / ||h||^2.
    """
    device = hidden.device
    logits = lm.logits(hidden[step.token_row, step.token_col]).float()
    token_logp = logits.log_softmax(-1).gather(1, step.token_id[:, None]).squeeze(1)
    correct = logits.argmax(-1) == step.token_id

    n_rows = len(step.rows)
    row_nll = torch.zeros(n_rows, device=device).index_add(0, step.token_row, -token_logp)
    n_tok = torch.zeros(n_rows, device=device).index_add(0, step.token_row, torch.ones_like(token_logp))
    rewrite = step.kind < 2
    row_nll = torch.where(rewrite, row_nll / n_tok.clamp(min=1), torch.zeros_like(row_nll))
    rewrite_rows = torch.zeros(n, device=device).index_add(0, step.request, rewrite.float()).clamp(min=1)
    nll = torch.zeros(n, device=device).index_add(0, step.request, row_nll) / rewrite_rows
    row_prob = torch.where(rewrite, torch.exp(-row_nll.detach()), torch.zeros_like(row_nll))
    target_prob = torch.zeros(n, device=device).index_add(0, step.request, row_prob) / rewrite_rows

    essence = torch.nonzero(step.kind == 2).squeeze(1)
    ess_req = step.request[essence]
    ess_logp = lm.logits(hidden[essence, 0]).float().log_softmax(-1)
    if first:
        kl_init[ess_req] = ess_logp.detach()
    kl = torch.zeros(n, device=device)
    kl[ess_req] = hp.kl_factor * (ess_logp.exp() * (ess_logp - kl_init[ess_req])).sum(-1)
    decay = hp.v_weight_decay * delta.norm(dim=1) / h.norm(dim=1).clamp(min=1e-12) ** 2
    qualifies = prefixed_targets_top1(correct, step.token_row, step.request, step.kind, n)
    return _Losses(nll + kl + decay, qualifies, target_prob)


def compute_target_vectors(
    lm: LocatedModel,
    tok,
    requests: list[EditRequest],
    prefixes: list[str],
    z_layer: int,
    hp: TargetOptimization,
    steps_lm: Optional[LocatedModel] = None,
) -> TargetVectors:
    """Optimise delta for every request of `requests` together (in chunks of `hp.chunk_size`, one
    after another); return z = h + delta and stats. `steps_lm` (from `step_model`) runs the steps
    in hp.compute_dtype; None: the model itself (made here if compute_dtype asks for another
    dtype; a run makes it once and passes it)."""
    if steps_lm is None and hp.compute_dtype and getattr(torch, hp.compute_dtype) != next(lm.model.parameters()).dtype:
        steps_lm = step_model(lm, z_layer, getattr(torch, hp.compute_dtype))
    size = hp.chunk_size or len(requests)
    if len(requests) > size:  # requests are independent: each chunk on its own
        whole = replace(hp, chunk_size=None)
        parts = [compute_target_vectors(lm, tok, requests[i : i + size], prefixes, z_layer, whole, steps_lm)
                 for i in range(0, len(requests), size)]
        return TargetVectors(*(torch.cat([getattr(p, f) for p in parts]) for f in ("z", "h", "steps", "target_prob")))
    device = lm.model.device
    rows = build_rows(tok, requests, prefixes)
    n, d = len(requests), lm.model.config.hidden_size
    forward = SuffixForward(lm, rows.prefix, rows.suffix, z_layer, tok.pad_token_id, rows.context, steps_lm)
    bare = torch.nonzero(rows.kind == 0).squeeze(1)
    h = torch.zeros((n, d), device=device)
    h[rows.request[bare].to(device)] = forward.h[bare.to(device)]
    reads = ReadPositions(rows, device)

    delta = torch.zeros((n, d), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init = torch.zeros((n, lm.model.config.vocab_size), device=device)
    z = torch.zeros((n, d), device=device)
    steps = torch.zeros(n, dtype=torch.long, device="cpu")  # per-request bookkeeping on the host
    target_prob = torch.zeros(n, device="cpu")
    mpes = MostProbableEarlyStopping(n, hp.extra_steps)
    active = torch.ones(n, dtype=torch.bool, device="cpu")

    for it in range(hp.v_num_grad_steps):
        step = reads.select(active.to(device))
        hidden = forward(step.rows, delta[step.request])
        out = _losses(forward.steps_lm, hidden, step, delta, h, kl_init, it == 0, hp, n)

        # Stop: MPES, or the loss below nll_stop, or the last step (one host read per step).
        stop = mpes.update(out.qualifies.cpu(), active)
        stop |= active & ((out.loss.detach().cpu() < hp.nll_stop) | (it == hp.v_num_grad_steps - 1))
        if stop.any():
            idx = torch.nonzero(stop).squeeze(1)
            z[idx] = (h[idx] + delta[idx]).detach()
            steps[idx] = it
            target_prob[idx] = out.target_prob[idx.to(device)].cpu()
            active &= ~stop
        if not active.any():
            break

        opt.zero_grad()
        out.loss[active.to(device)].sum().backward()
        opt.step()
        with torch.no_grad():  # project delta into the ball of radius clamp_norm_factor * ||h||
            max_norm = hp.clamp_norm_factor * h.norm(dim=1, keepdim=True)
            norm = delta.norm(dim=1, keepdim=True)
            delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))
    return TargetVectors(z=z, h=h, steps=steps, target_prob=target_prob)

"""The faithful reference path of the published code: one request at a time, the whole model and
the full vocabulary projection at every step. Slow; used to check the fast path and to benchmark.
"""

import torch

from .data import EditRequest
from .forward import block_output, pad_right
from .layouts import LocatedModel
from .prompts import encode
from .target_vectors import TargetOptimization, TargetVectors


def reference_target_vector(
    lm: LocatedModel, tok, request: EditRequest, prefixes: list[str], z_layer: int, hp: TargetOptimization
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """z, h, steps and final target probability for one request, as the published loop computes them."""
    device = lm.model.device
    prompts = [encode(tok, request.prompt, request.subject, prefix=c, target=request.target_new) for c in [""] + prefixes]
    essence = encode(tok, "{} is a", request.subject)
    encoded = prompts + [essence]
    ids, mask = pad_right([e.ids for e in encoded], tok.pad_token_id, device)
    lookup = [e.subject_last for e in encoded]
    delta = torch.zeros(lm.model.config.hidden_size, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state = {}

    def add_delta(module, args, output):
        hidden = block_output(output)
        if "h" not in state:
            state["h"] = hidden[0, lookup[0]].detach().float().clone()
        hidden = hidden.clone()
        for i, idx in enumerate(lookup):
            hidden[i, idx] = hidden[i, idx] + delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    hits, kl_init = 0, None
    for it in range(hp.v_num_grad_steps):
        handle = lm.block(z_layer).register_forward_hook(add_delta)
        try:
            logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()
        finally:
            handle.remove()
        logp = logits.log_softmax(-1)
        ess_logp = logp[-1, lookup[-1]]
        if kl_init is None:
            kl_init = ess_logp.detach()
        row_nll, row_ok = [], []
        for i, e in enumerate(prompts):
            pos = torch.tensor(e.target_positions(), device=device)
            tgt = torch.tensor(e.target_ids, device=device)
            row_nll.append(-logp[i, pos, tgt].sum() / len(e.target_ids))
            row_ok.append(bool((logits[i, pos].argmax(-1) == tgt).all()))
        row_nll = torch.stack(row_nll)
        nll = row_nll.mean()
        kl = hp.kl_factor * (ess_logp.exp() * (ess_logp - kl_init)).sum()
        decay = hp.v_weight_decay * delta.norm() / state["h"].norm() ** 2
        loss = nll + kl + decay
        prob = torch.exp(-row_nll).mean().item()
        if hp.extra_steps is not None and all(row_ok[1:]):
            hits += 1
            if hits == 1 + hp.extra_steps:
                break
        if loss.item() < hp.nll_stop or it == hp.v_num_grad_steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * state["h"].norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return (state["h"] + delta).detach(), state["h"], it, prob


def reference_target_vectors(
    lm: LocatedModel, tok, requests: list[EditRequest], prefixes: list[str], z_layer: int, hp: TargetOptimization
) -> TargetVectors:
    out = [reference_target_vector(lm, tok, r, prefixes, z_layer, hp) for r in requests]
    return TargetVectors(
        z=torch.stack([o[0] for o in out]),
        h=torch.stack([o[1] for o in out]),
        steps=torch.tensor([o[2] for o in out], device="cpu"),
        target_prob=torch.tensor([o[3] for o in out], device="cpu"),
    )

"""The weight update: after each edit batch, solve for and add the increment of every edited layer.

Step 3 of METHOD.md. For the layers l_1 < ... < l_m of the window, in order, on the current
(already partly updated) model: keys K at layer l, residual R = Z - H (targets minus the current
output of the z layer), resid = R / (m - j), increment D from the configured solver (ENCORE's
norm-constrained least squares, MEMIT or AlphaEdit), then K K^T joins the running sum of
previous keys.
"""

import time
from typing import Callable

import lightning as L
import torch

from .data import EditRequest
from .keys import compute_keys
from .layouts import LocatedModel
from .solvers import alphaedit_update, encore_update

Solve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, resid, keys) -> D


def spread_update(
    lm: LocatedModel,
    tok,
    requests: list[EditRequest],
    prefixes: list[str],
    layers: list[int],
    z_layer: int,
    z: torch.Tensor,
    solve: Solve,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Apply the update layer by layer; return {layer: (increment D, keys K [d_ff, n])}."""
    applied = {}
    for j, layer in enumerate(layers):
        keys, current = compute_keys(lm, tok, requests, prefixes, [layer], z_layer)
        k = keys[layer].T.double()  # [d_ff, n]
        resid = (z.to(current.device) - current).T.double() / (len(layers) - j)  # [d_model, n]
        d = solve(layer, resid, k)
        if not torch.isfinite(d).all():
            raise FloatingPointError(f"non-finite update for layer {layer}")
        lm.add_to_weight(layer, d)
        applied[layer] = (d, k)
    return applied


class LeastSquaresUpdate(L.Callback):
    """Applies the solver's closed-form update to the located down matrices after each step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = pl_module
        cfg = m.solver

        def solve(layer: int, resid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            prev = m.prev_keys(layer) if cfg.use_prev_keys else None
            if cfg.method == "alphaedit":
                return alphaedit_update(resid, k, m.projectors[layer].to(k.device), cfg.alphaedit_l2, prev)
            lambda_n = cfg.lambda_n if cfg.method == "encore" else 0.0
            return encore_update(resid, k, m.c0[layer].to(k.device), cfg.lambda_p, lambda_n, prev)

        applied = spread_update(m.lm, m.tokenizer, batch, m.context_prefixes, m.layers, m.z_layer, outputs["z"], solve)
        for layer, (_, k) in applied.items():
            m.prev_keys(layer).add_(k @ k.T)
        m.edited.extend(batch)

        seconds = time.perf_counter() - outputs["start"]
        steps = outputs["steps"].float()
        norms = {l: m.lm.weight_out_in(l).norm().item() for l in applied}
        m.history.append({
            "batch": batch_idx,
            "num_edits": len(m.edited),
            "seconds": seconds,
            "z_steps_mean": steps.mean().item(),
            "weight_norm": {str(l): v for l, v in norms.items()},
            "weight_norm_ratio": {str(l): v / m.original_norms[l] for l, v in norms.items()},
            "increment_norm": {str(l): d.norm().item() for l, (d, _) in applied.items()},
        })
        log = {"edit/seconds": seconds, "edit/z_steps_mean": steps.mean().item(), "edit/z_steps_max": steps.max().item()}
        for layer, (d, _) in applied.items():
            log[f"weight_norm/layer_{layer}"] = norms[layer]
            log[f"increment_norm/layer_{layer}"] = d.norm().item()
        m.log_dict(log, on_step=True, on_epoch=False, batch_size=len(batch))

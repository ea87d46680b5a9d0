"""The weight update: after each edit batch, solve for and add the increment of every edited layer.

Step 3 of METHOD.md. For the layers l_1 < ... < l_m of the window, in order, on the current
(already partly updated) model: keys K at layer l, residual R = Z - H (targets minus the current
output of the z layer), resid = R / (m - j), increment D from the configured solver (ENCORE's
norm-constrained least squares, MEMIT or AlphaEdit), then K K^T joins the running sum of
previous keys.
"""

import time

import lightning as L
import torch

from .keys import compute_keys
from .solvers import alphaedit_update, encore_update


class LeastSquaresUpdate(L.Callback):
    """Applies the solver's closed-form update to the located down matrices after each step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = pl_module
        cfg = m.solver
        z = outputs["z"]
        increments = {}
        for j, layer in enumerate(m.layers):
            keys, current = compute_keys(m.lm, m.tokenizer, batch, m.context_prefixes, [layer], m.z_layer)
            k = keys[layer].T.double()  # [d_ff, n]
            resid = (z - current).T.double() / (len(m.layers) - j)  # [d_model, n]
            prev = m.prev_keys(layer) if cfg.use_prev_keys else None
            if cfg.method == "alphaedit":
                d = alphaedit_update(resid, k, m.projectors[layer].to(k.device), cfg.alphaedit_l2, prev)
            else:
                lambda_n = cfg.lambda_n if cfg.method == "encore" else 0.0
                d = encore_update(resid, k, m.c0[layer].to(k.device), cfg.lambda_p, lambda_n, prev)
            if not torch.isfinite(d).all():
                raise FloatingPointError(f"non-finite update for layer {layer} in batch {batch_idx}")
            m.lm.add_to_weight(layer, d)
            m.prev_keys(layer).add_(k @ k.T)
            increments[layer] = d.norm().item()
        m.edited.extend(batch)

        seconds = time.perf_counter() - outputs["start"]
        steps = outputs["steps"].float()
        m.batch_stats.append({"seconds": seconds, "steps": outputs["steps"].tolist()})
        log = {"edit/seconds": seconds, "edit/z_steps_mean": steps.mean().item(), "edit/z_steps_max": steps.max().item()}
        for layer in m.layers:
            log[f"weight_norm/layer_{layer}"] = m.lm.weight_out_in(layer).norm().item()
            log[f"increment_norm/layer_{layer}"] = increments[layer]
        m.log_dict(log, on_step=True, on_epoch=False, batch_size=len(batch))

"""The weight update of one edit batch: solve for and add the increment of every edited layer.

Step 3 of METHOD.md. For the layers l_1 < ... < l_m of the window, in order, on the current
(already partly updated) model: keys K at layer l, residual R = Z - H (targets minus the current
output of the z layer), resid = R / (m - j), increment D from the configured solver (ENCORE's
norm-constrained least squares, MEMIT or AlphaEdit), then K K^T joins the running sum of
previous keys.
"""

import time
from typing import Callable, NamedTuple, Optional

import torch

from .data import EditRequest
from .edited import EditedLayers
from .keys import WindowKeys
from .ranks import Ranks

Solve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, resid, keys) -> D


def spread_update(
    edited: EditedLayers,
    tok,
    requests: list[EditRequest],
    prefixes: list[str],
    z_layer: int,
    z: torch.Tensor,
    solve: Solve,
    seconds: Optional[dict[str, float]] = None,
    ranks: Optional[Ranks] = None,
) -> dict[int, "Increment"]:
    """Apply the update layer by layer (the window of `edited`); return {layer: Increment}. A
    non-finite update of any layer undoes those already applied and raises FloatingPointError.

    `seconds` (if given) accumulates the time spent on "keys" and on "solve". With several
    processes (`ranks`), each computes the keys of its share of the requests, all are gathered,
    process 0 solves and broadcasts the increment.
    """
    applied = {}
    seconds = {} if seconds is None else seconds
    ranks = ranks or Ranks()
    lm, layers = edited.lm, edited.layers
    share = ranks.share(requests)
    window = WindowKeys(lm, tok, share, prefixes, z_layer) if share else None
    d_out, d_ff = lm.weight_out_in(layers[0]).shape
    device = lm.model.device
    for j, layer in enumerate(layers):
        start = time.perf_counter()
        if window is not None:
            keys, current = window.at(layer)
        else:  # fewer requests than processes
            keys, current = torch.zeros(0, d_ff, device=device), torch.zeros(0, z.shape[1], device=device)
        keys, current = ranks.gather(keys, len(requests)), ranks.gather(current, len(requests))
        k = keys.T.double()  # [d_ff, n]
        resid = (z.to(current.device) - current).T.double() / (len(layers) - j)  # [d_model, n]
        middle = time.perf_counter()
        # Process 0 solves (float64) and broadcasts the increment as float32, the precision of the
        # cumulative increment it joins: every process then adds the same bits.
        if ranks.rank == 0:
            d = solve(layer, resid, k).to(device, torch.float32)
        else:
            d = torch.empty(d_out, d_ff, dtype=torch.float32, device=device)
        d = ranks.broadcast(d.contiguous())
        seconds["keys"] = seconds.get("keys", 0.0) + middle - start
        seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - middle
        if not torch.isfinite(d).all():
            for done in applied.values():  # undo: the weights are left exactly as they were
                done.restore()
            raise FloatingPointError(f"the update of layer {layer} is not finite")
        applied[layer] = Increment(d, k, edited.increment(layer).clone(), edited, layer)
        edited.add(layer, d)
    return applied


class Increment(NamedTuple):
    """One layer's applied update: increment D [out, in], keys K [d_ff, n], the cumulative
    increment before it."""

    d: torch.Tensor
    k: torch.Tensor
    before: torch.Tensor
    edited: EditedLayers
    layer: int

    def restore(self) -> None:
        """The layer's cumulative increment and weight as they were (bitwise: the weight is a
        function of the increment)."""
        self.edited.increment(self.layer).copy_(self.before)
        self.edited.set_weight(self.layer)

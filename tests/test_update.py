"""The residual is spread over the window, and the last layer closes the remaining gap."""

import torch

from encore_pl.callbacks import spread_update
from encore_pl.data import QUICKSTART_PATH, load_requests
from encore_pl.keys import compute_keys
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer
from encore_pl.solvers import memit_update


def test_residual_spread_across_layers(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    lm = LocatedModel(model)
    requests, _ = load_requests(QUICKSTART_PATH, num_edits=3)
    prefixes = ["The first thing. ", "I know. "]
    layers, z_layer = [1, 2], 2
    _, h = compute_keys(lm, tok, requests, prefixes, layers, z_layer)
    torch.manual_seed(0)
    z = h + 0.5 * torch.randn_like(h) * h.norm(dim=1, keepdim=True) / h.shape[1] ** 0.5
    c0 = torch.eye(lm.weight_out_in(1).shape[1], dtype=torch.float64)
    seen = []

    def solve(layer, resid, k):
        seen.append(resid.clone())
        return memit_update(resid, k, c0, 1e-6)  # almost no preservation: each layer meets its share

    spread_update(lm, tok, requests, prefixes, layers, z_layer, z, solve)
    # First layer: half of the full residual. Second (last) layer: all that remains.
    torch.testing.assert_close(seen[0], (z - h).T.double() / 2)
    # The first layer's increment moved the z-layer output toward z: less than the full gap remains.
    assert seen[1].norm() < 2 * seen[0].norm()
    _, after = compute_keys(lm, tok, requests, prefixes, layers, z_layer)
    assert (after - z).norm() < 0.02 * (h - z).norm()

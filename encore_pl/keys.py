"""Keys (inputs of the down matrices) and layer outputs at the subject's last token.

Step 2 of METHOD.md: the key of a request at a layer is 0.5 * (key in the bare prompt) + 0.5 *
(mean key over the context-prefixed prompts). The forward pass stops after the last layer needed.
"""

from contextlib import contextmanager
from typing import Optional

import torch

from .data import EditRequest
from .forward import StopForward, block_output, pad_right, replayed, run_to_stop
from .layouts import LocatedModel
from .prompts import encode


@contextmanager
def capture(lm: LocatedModel, key_layers: list[int], output_layers: list[int]):
    """Record down-matrix inputs of `key_layers` and block outputs of `output_layers`; the forward
    pass stops (StopForward) right after the last of them is recorded."""
    keys, outputs, handles = {}, {}, []
    # The last record: block omax's output, unless a key of a later layer comes after it.
    last_key = max(key_layers, default=-1)
    stop_at_key = last_key > max(output_layers, default=-1)

    def keep_key(module, args, layer):
        keys[layer] = args[0]
        if stop_at_key and layer == last_key:
            raise StopForward

    def keep_output(module, args, out, layer):
        outputs[layer] = block_output(out)
        if not stop_at_key and layer == max(output_layers):
            raise StopForward

    for layer in key_layers:
        handles.append(lm.down_proj(layer).register_forward_pre_hook(lambda m, a, l=layer: keep_key(m, a, l)))
    for layer in output_layers:
        handles.append(lm.block(layer).register_forward_hook(lambda m, a, out, l=layer: keep_output(m, a, out, l)))
    try:
        yield keys, outputs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def compute_keys(
    lm: LocatedModel,
    tok,
    requests: list[EditRequest],
    prefixes: list[str],
    layers: list[int],
    z_layer: int | None = None,
    batch_size: int = 64,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys [n, d_ff] per layer, and (if `z_layer`) layer `z_layer`'s output [n, d] on the bare prompt."""
    contexts = [""] + list(prefixes)
    encoded = [encode(tok, r.prompt, r.subject, prefix=c) for r in requests for c in contexts]
    out_layers = [z_layer] if z_layer is not None else []
    row_keys = {l: [] for l in layers}
    row_outs = []
    device = lm.model.device
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = pad_right([e.ids for e in chunk], tok.pad_token_id, device)
        where = torch.tensor([e.subject_last for e in chunk], device=device)
        rows = torch.arange(len(chunk), device=device)
        with capture(lm, layers, out_layers) as (keys, outputs):
            run_to_stop(lm, input_ids=ids, attention_mask=mask)
        for l in layers:
            row_keys[l].append(keys[l][rows, where].float())
        if z_layer is not None:
            row_outs.append(outputs[z_layer][rows, where].float())
    n, c = len(requests), len(contexts)
    result = {l: _average_over_contexts(torch.cat(row_keys[l]), n, c) for l in layers}
    z_out = torch.cat(row_outs).view(n, c, -1)[:, 0] if z_layer is not None else None
    return result, z_out


def _average_over_contexts(k: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """0.5 * key on the bare prompt + 0.5 * mean key over the context-prefixed prompts."""
    k = k.view(n, c, -1)
    return 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1) if c > 1 else k[:, 0]


class WindowKeys:
    """Keys of the window's layers, one layer at a time, while the window is being updated.

    `at(layer)` returns the keys of `layer` and the output of `z_layer` (bare prompt) on the
    current model. The caller then updates `layer`'s down matrix, which leaves the input of block
    `layer` unchanged: it is kept, and the next call starts there instead of at the embeddings.
    """

    def __init__(self, lm: LocatedModel, tok, requests: list[EditRequest], prefixes: list[str], z_layer: int, batch_size: int = 64):
        self.lm, self.z_layer = lm, z_layer
        self.n, self.c = len(requests), 1 + len(prefixes)
        encoded = [encode(tok, r.prompt, r.subject, prefix=c) for r in requests for c in [""] + list(prefixes)]
        device = lm.model.device
        self.chunks = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            ids, mask = pad_right([e.ids for e in chunk], tok.pad_token_id, device)
            self.chunks.append((ids, mask, torch.tensor([e.subject_last for e in chunk], device=device)))
        self.start, self.arity = 0, 0
        self.saved: list[Optional[torch.Tensor]] = [None] * len(self.chunks)  # input of block `start`

    @torch.no_grad()
    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [n, d_ff] of `layer` and the z-layer output [n, d], on the model as it is now."""
        if layer < self.start or layer > self.z_layer:
            raise ValueError(f"keys of layer {layer} asked after layer {self.start} (z layer {self.z_layer})")
        keys, outs = [], []
        for i, (ids, mask, where) in enumerate(self.chunks):
            seen = {}

            def keep_input(module, args, kwargs):
                seen["input"] = args[0] if args else kwargs["hidden_states"]

            def keep_key(module, args):
                seen["key"] = args[0]

            def keep_output(module, args, output):
                seen["out"], self.arity = block_output(output), len(output) if isinstance(output, tuple) else 0
                raise StopForward

            handles = [
                self.lm.block(layer).register_forward_pre_hook(keep_input, with_kwargs=True),
                self.lm.down_proj(layer).register_forward_pre_hook(keep_key),
                self.lm.block(self.z_layer).register_forward_hook(keep_output),
            ]
            try:
                if self.start == 0:
                    run_to_stop(self.lm, input_ids=ids, attention_mask=mask)
                else:
                    with replayed(self.lm, self.start - 1, self.arity, self.saved[i]):
                        run_to_stop(self.lm, input_ids=ids, attention_mask=mask)
            finally:
                for h in handles:
                    h.remove()
            rows = torch.arange(len(ids), device=ids.device)
            keys.append(seen["key"][rows, where].float())
            outs.append(seen["out"][rows, where].float())
            self.saved[i] = seen["input"]
        self.start = layer
        z_out = torch.cat(outs).view(self.n, self.c, -1)[:, 0]
        return _average_over_contexts(torch.cat(keys), self.n, self.c), z_out

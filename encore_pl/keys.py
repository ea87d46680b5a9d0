"""Keys (inputs of the down matrices) and layer outputs at the subject's last token.

Step 2 of METHOD.md: the key of a request at a layer is 0.5 * (key in the bare prompt) + 0.5 *
(mean key over the context-prefixed prompts). The forward pass stops after the last layer needed.
"""

from contextlib import contextmanager

import torch

from .data import EditRequest
from .layouts import LocatedModel
from .prompts import encode


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed layer has run."""


def pad_right(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def block_output(output) -> torch.Tensor:
    """The hidden state of a decoder block's output (a tensor, or a tuple holding it first)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(lm: LocatedModel, key_layers: list[int], output_layers: list[int], stop_after: int):
    """Record down-matrix inputs of `key_layers`, block outputs of `output_layers`; stop after a layer."""
    keys, outputs, handles = {}, {}, []
    for layer in key_layers:
        handles.append(
            lm.down_proj(layer).register_forward_pre_hook(lambda m, args, l=layer: keys.__setitem__(l, args[0]))
        )
    for layer in output_layers:
        handles.append(
            lm.block(layer).register_forward_hook(lambda m, a, out, l=layer: outputs.__setitem__(l, block_output(out)))
        )

    def stop(module, args, output):
        raise StopForward

    handles.append(lm.block(stop_after).register_forward_hook(stop))
    try:
        yield keys, outputs
    finally:
        for h in handles:
            h.remove()


def run_to_stop(lm: LocatedModel, **inputs) -> None:
    try:
        lm.model.base_model(**inputs, use_cache=False)
    except StopForward:
        pass


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
    stop_after = max(layers + ([z_layer] if z_layer is not None else []))
    out_layers = [z_layer] if z_layer is not None else []
    row_keys = {l: [] for l in layers}
    row_outs = []
    device = lm.model.device
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = pad_right([e.ids for e in chunk], tok.pad_token_id, device)
        where = torch.tensor([e.subject_last for e in chunk], device=device)
        rows = torch.arange(len(chunk), device=device)
        with capture(lm, layers, out_layers, stop_after) as (keys, outputs):
            run_to_stop(lm, input_ids=ids, attention_mask=mask)
        for l in layers:
            row_keys[l].append(keys[l][rows, where].float())
        if z_layer is not None:
            row_outs.append(outputs[z_layer][rows, where].float())
    n, c = len(requests), len(contexts)
    result = {}
    for l in layers:
        k = torch.cat(row_keys[l]).view(n, c, -1)
        result[l] = 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1) if c > 1 else k[:, 0]
    z_out = torch.cat(row_outs).view(n, c, -1)[:, 0] if z_layer is not None else None
    return result, z_out

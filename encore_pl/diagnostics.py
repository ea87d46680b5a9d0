"""Seeing importance hacking: how large the edited layers' contributions become.

Per edited layer: the Frobenius norm of the weight and its ratio to the original, and the norm of
the layer's MLP output relative to the residual stream (the block's output) on a fixed set of
generic probe sentences, averaged over tokens.
"""

from pathlib import Path
from typing import Optional

import torch

from .forward import StopForward, pad_right
from .layouts import LocatedModel

# Generic sentences written for this project: plain prose with no edited facts in it.
PROBE_TEXTS = [
    "The weather was mild for most of the week, with a little rain on Thursday afternoon.",
    "She opened the window, made a cup of tea and sat down to read the letter again.",
    "Most of the committee agreed that the new schedule would be easier for everyone.",
    "After the meeting, the team walked to a small restaurant near the station for lunch.",
    "The book explains how simple machines such as levers and pulleys make work easier.",
    "Children in the village learned to swim in the lake during the long summer holidays.",
    "He wrote down the numbers carefully, checked them twice and handed the sheet back.",
    "The museum will be closed on Monday while the workers repair the roof of the hall.",
]


def probe_texts(path: Optional[str] = None) -> list[str]:
    if path is None:
        return PROBE_TEXTS
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"probe text file {path} has no text")
    return lines


@torch.no_grad()
def mlp_residual_ratio(lm: LocatedModel, tok, texts: list[str], layers: list[int]) -> dict[int, float]:
    """Mean over tokens of ||MLP output|| / ||block output|| for each layer."""
    ids, mask = pad_right([tok(t).input_ids for t in texts], tok.pad_token_id, lm.model.device)
    mlp_out, block_out, handles = {}, {}, []
    for l in layers:
        handles.append(lm.down_proj(l).register_forward_hook(lambda m, a, o, l=l: mlp_out.__setitem__(l, o)))
        handles.append(lm.block(l).register_forward_hook(
            lambda m, a, o, l=l: block_out.__setitem__(l, o[0] if isinstance(o, tuple) else o)))

    def stop(module, args, output):
        raise StopForward

    handles.append(lm.block(max(layers)).register_forward_hook(stop))
    try:
        lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    keep = mask.bool()
    return {
        l: (mlp_out[l].float().norm(dim=-1) / block_out[l].float().norm(dim=-1).clamp(min=1e-12))[keep].mean().item()
        for l in layers
    }

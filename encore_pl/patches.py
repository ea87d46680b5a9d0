"""Edit patches: the cumulative change of every edited matrix, in one safetensors file.

Tensors are named after the edited module (e.g. "model.layers.4.mlp.down_proj") and stored as
[out, in] increments in float32; the metadata says what was edited, how and on which base.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .layouts import LocatedModel


def edit_increments(lm: LocatedModel, base: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module name: current minus base weight [out, in]} for every layer in `base`."""
    return {
        lm.down_proj_name(l): (lm.weight_out_in(l).detach().float() - w.float()).cpu().contiguous()
        for l, w in base.items()
    }


def save_patch(path: Path, increments: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write atomically: the file is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(increments, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)

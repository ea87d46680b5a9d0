"""Edit patches: the cumulative change of every edited matrix, in one safetensors file.

Tensors are named after the edited module (e.g. "model.layers.4.mlp.down_proj") and stored as
[out, in] increments in float32. The metadata says what was edited, how and on which base:
`base_sha256` hashes the base weights of the edited modules, `patched_sha256` the same modules
after the patch is added (both as float32), so a patch is applied only to its own base and
reverted only from a model it was applied to.

    python scripts/patch.py apply  --model BASE   --patch edits.safetensors --output EDITED
    python scripts/patch.py revert --model EDITED --patch edits.safetensors --output BASE_AGAIN
    encore_pl.apply_patch(model, "edits.safetensors")   # from Python, on a loaded model (and revert_patch)
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import replaced
from .layouts import LocatedModel


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A hash of named float32 matrices (names sorted)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_patch(path: Path, increments: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write atomically: the file is either complete or absent."""
    with replaced(path) as tmp:
        save_file(increments, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})


def load_patch(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Increments and metadata (JSON values decoded) of a patch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            increments = {name: f.get_tensor(name) for name in f.keys()}
            raw = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"patch {path} cannot be read (corrupt, or not a safetensors file): {e}") from None
    if "base_sha256" not in raw or "layers" not in raw:
        raise ValueError(f"patch {path} has no encore-pl metadata (base_sha256, layers)")
    metadata = {}
    for k, v in raw.items():
        try:
            metadata[k] = json.loads(v)
        except json.JSONDecodeError:
            metadata[k] = v
    return increments, metadata


def edited_weights(lm: LocatedModel, metadata: dict, increments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's current [out, in] weights of the modules the patch edits (by name)."""
    lm.check_layers(metadata["layers"])
    names = {lm.down_proj_name(l): l for l in metadata["layers"]}
    if set(names) != set(increments):
        raise ValueError(f"the patch edits {sorted(increments)}, which are not this model's {sorted(names)}")
    weights = {}
    for name, l in names.items():
        w = lm.weight_out_in(l)
        if w.shape != increments[name].shape:
            raise ValueError(f"{name}: the patch's increment is {tuple(increments[name].shape)}, the model's weight {tuple(w.shape)}")
        weights[name] = w
    return weights


@torch.no_grad()
def add_increments(lm: LocatedModel, increments: dict[str, torch.Tensor], metadata: dict, sign: int = 1) -> None:
    """Add (sign=1) or subtract (sign=-1, revert) a patch, after checking the model's hash."""
    weights = edited_weights(lm, metadata, increments)
    expected, what = (metadata["base_sha256"], "base") if sign > 0 else (metadata["patched_sha256"], "patched")
    found = weights_sha256(weights)
    if found != expected:
        raise ValueError(
            f"refusing to {'apply' if sign > 0 else 'revert'} the patch: the edited modules of this model do not match "
            f"the patch's {what} weights (sha256 {found[:12]}... != {expected[:12]}...); "
            f"{'the patch was made on ' + str(metadata.get('base_model')) if sign > 0 else 'was the patch applied to this model?'}"
        )
    for name, w in weights.items():
        if w.dtype != torch.float32:
            raise ValueError(f"{name} is {w.dtype}: load the model in float32 to apply a patch exactly")
        w.add_(sign * increments[name].to(w.device))  # w is the [out, in] view of the stored weight


def apply_patch(model, path: str | Path) -> dict:
    """Add the patch at `path` to `model` (a float32 copy of its base model), in place; its metadata."""
    increments, metadata = load_patch(path)
    add_increments(LocatedModel(model), increments, metadata, 1)
    return metadata


def revert_patch(model, path: str | Path) -> dict:
    """Subtract the patch at `path` from `model` (a model it was applied to), in place; its metadata."""
    increments, metadata = load_patch(path)
    add_increments(LocatedModel(model), increments, metadata, -1)
    return metadata

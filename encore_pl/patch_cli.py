"""The `patch` command: apply an edit patch to its base model, or revert it; the result is saved as
a model directory that `AutoModelForCausalLM.from_pretrained` loads.

    encore-pl patch apply  --model smollm2-135m --patch lightning_logs/version_0/edits.safetensors --output edited
    encore-pl patch revert --model edited       --patch lightning_logs/version_0/edits.safetensors --output base
    encore-pl patch show   --patch lightning_logs/version_0/edits.safetensors

From a checkout, `python scripts/patch.py apply ...` is the same. The patch format is encore_pl/patches.py.
"""

from pathlib import Path
from typing import Optional, Sequence

from jsonargparse import CLI

from .cli import user_errors
from .layouts import LocatedModel
from .models import load_model_and_tokenizer
from .patches import add_increments, load_patch


def _patched(model: str, patch: str, output: str, sign: int, trust_remote_code: bool) -> None:
    increments, metadata = load_patch(patch)
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {output!r} exists and is not empty")
    lm_model, tok = load_model_and_tokenizer(model, "float32", trust_remote_code)
    add_increments(LocatedModel(lm_model), increments, metadata, sign)
    lm_model.save_pretrained(out)
    tok.save_pretrained(out)
    what = "applied" if sign > 0 else "reverted"
    print(f"{what} {len(metadata.get('request_ids', []))} edits ({metadata.get('method')}, layers {metadata['layers']}): {out}")


def apply(model: str, patch: str, output: str, trust_remote_code: bool = False) -> None:
    """Add a patch to its base model and save the edited model.

    Args:
        model: the base model (hub id, directory, or "smollm2-135m"); loaded in float32.
        patch: an `edits.safetensors` written by a run.
        output: new directory for the edited model (save_pretrained).
        trust_remote_code: allow model code from the hub.
    """
    _patched(model, patch, output, +1, trust_remote_code)


def revert(model: str, patch: str, output: str, trust_remote_code: bool = False) -> None:
    """Subtract a patch from a model it was applied to (rollback) and save the result.

    Args:
        model: the edited model (e.g. the output of `apply`); loaded in float32.
        patch: the patch that was applied.
        output: new directory for the restored model.
        trust_remote_code: allow model code from the hub.
    """
    _patched(model, patch, output, -1, trust_remote_code)


def show(patch: str) -> None:
    """Print a patch's metadata and the norm of each increment.

    Args:
        patch: an `edits.safetensors` file.
    """
    increments, metadata = load_patch(patch)
    for key in ("base_model", "method", "layers", "base_sha256", "patched_sha256"):
        print(f"{key}: {metadata.get(key)}")
    print(f"edited requests: {len(metadata.get('request_ids', []))}, skipped: {len(metadata.get('skipped_ids', []))}")
    for name, inc in increments.items():
        print(f"{name}: increment {tuple(inc.shape)}, Frobenius norm {inc.norm():.4f}")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """Run `apply`, `revert` or `show` from command line arguments (default: sys.argv)."""
    with user_errors():
        CLI([apply, revert, show], args=None if argv is None else list(argv), as_positional=False, prog=prog)

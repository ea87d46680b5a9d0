"""Apply an edit patch to its base model, or revert it; the result is saved as a model directory
that `AutoModelForCausalLM.from_pretrained` loads.

    python scripts/patch.py apply  --model smollm2-135m --patch lightning_logs/version_0/edits.safetensors --output edited
    python scripts/patch.py revert --model edited       --patch lightning_logs/version_0/edits.safetensors --output base
    python scripts/patch.py show   --patch lightning_logs/version_0/edits.safetensors
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jsonargparse import CLI  # noqa: E402

from encore_pl.cli import user_errors  # noqa: E402
from encore_pl.layouts import LocatedModel  # noqa: E402
from encore_pl.models import load_model_and_tokenizer  # noqa: E402
from encore_pl.patches import add_increments, load_patch  # noqa: E402


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


if __name__ == "__main__":
    with user_errors():
        CLI([apply, revert, show], as_positional=False)

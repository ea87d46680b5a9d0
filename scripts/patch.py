"""Apply an edit patch to its base model, or revert it (`encore-pl patch`; see encore_pl/patch_cli.py).

    python scripts/patch.py apply  --model smollm2-135m --patch lightning_logs/version_0/edits.safetensors --output edited
    python scripts/patch.py revert --model edited       --patch lightning_logs/version_0/edits.safetensors --output base
    python scripts/patch.py show   --patch lightning_logs/version_0/edits.safetensors
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from encore_pl.patch_cli import main  # noqa: E402

if __name__ == "__main__":
    main()

"""Edit a causal LM with ENCORE, MEMIT or AlphaEdit.

    python scripts/train.py fit --config configs/quickstart.yaml        # edit, then score
    python scripts/train.py validate --config configs/quickstart.yaml   # score without editing
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from encore_pl.cli import main  # noqa: E402

if __name__ == "__main__":
    main()

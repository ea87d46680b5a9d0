"""Plot one or more editing runs from their results.json files (`encore-pl plot`; see encore_pl/plots.py).

    python scripts/plot_run.py lightning_logs/version_0
    python scripts/plot_run.py runs/encore runs/memit runs/alphaedit --out figures/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from encore_pl.plots import main  # noqa: E402

if __name__ == "__main__":
    main()

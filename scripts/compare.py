"""Compare editing runs in one Markdown table (`encore-pl compare`; see encore_pl/compare.py).

    python scripts/compare.py runs/encore runs/memit runs/alphaedit
    python scripts/compare.py runs/* --out comparison.md
    python scripts/compare.py runs/encore runs/memit --at 1000      # the runs' state at 1,000 edits
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from encore_pl.compare import main  # noqa: E402

if __name__ == "__main__":
    main()

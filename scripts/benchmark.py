"""How fast an editing run is, and where its time goes (`encore-pl benchmark`; see encore_pl/benchmark.py).

    python scripts/benchmark.py --config configs/smollm2-135m/encore.yaml \\
        --data.num_edits 100 --data.batch_size 25 [--json] [--no-reference] [--no-bfloat16]
    python scripts/benchmark.py --config configs/smollm2-135m/encore.yaml --data.num_edits 100 \\
        --batch-sizes 25 50 100        # seconds per edit of the batched path at each batch size
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from encore_pl.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()

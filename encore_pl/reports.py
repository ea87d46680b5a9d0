"""Reading finished runs (their results.json) for figures and comparison tables."""

import json
from pathlib import Path


def load_run(path: Path) -> dict:
    """The run's results.json as a dict; raises ValueError with a message naming the file."""
    file = path if path.name == "results.json" else path / "results.json"
    if not file.is_file():
        raise ValueError(f"{file}: no such file (is {path} a run directory?)")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(results, dict) or "method" not in results:
        raise ValueError(f"{file}: not an editing run's results (no 'method' key)")
    return results


def run_names(paths: list[Path]) -> list[str]:
    """Each run directory's name; when names collide (lightning_logs/version_0 twice), the last part
    of the paths where they differ (e.g. the experiment directory above lightning_logs)."""
    dirs = [(p.parent if p.name == "results.json" else p).resolve() for p in paths]
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    k = 1  # skip the trailing path parts all runs share
    while all(len(d.parts) > k for d in dirs) and len({d.parts[-k] for d in dirs}) == 1:
        k += 1
    names = [d.parts[-k] if len(d.parts) >= k else str(d) for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def run_labels(paths: list[Path], runs: list[dict]) -> list[str]:
    """`method`, or `method (run name)` when the method repeats."""
    names = run_names(paths)
    methods = [r["method"] for r in runs]
    return [m if methods.count(m) == 1 else f"{m} ({n})" for m, n in zip(methods, names)]

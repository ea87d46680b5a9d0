"""Reading runs for figures and comparison tables: a finished run's results.json, or, for a run
still going (or killed), what its last checkpoint holds."""

import json
import warnings
from pathlib import Path


def load_run(path: Path) -> dict:
    """The run's results.json as a dict; raises ValueError with a message naming the file. A run
    without results.json but with checkpoints/last.ckpt is read from the checkpoint (`partial`)."""
    file = path if path.name == "results.json" else path / "results.json"
    if not file.is_file() and (path / "checkpoints" / "last.ckpt").is_file():
        return run_so_far(path / "checkpoints" / "last.ckpt")
    if not file.is_file():
        raise ValueError(f"{file}: no such file (is {path} a run directory?)")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(results, dict) or "method" not in results:
        raise ValueError(f"{file}: not an editing run's results (no 'method' key)")
    return results


def load_runs(parser, paths: list[Path]) -> list[dict]:
    """Every run of a command's RUN_DIR arguments; a bad one ends the command with its message
    (argparse's error: exit code 2)."""
    try:
        return [load_run(p) for p in paths]
    except ValueError as e:
        parser.error(str(e))


def run_so_far(checkpoint: Path) -> dict:
    """What a run's last checkpoint says, in the shape of results.json: its records (history,
    retention curve, downstream history, per-request lists) and, as its scores, the last point of
    its retention curve. Marked `"partial": true`."""
    import torch

    from .metrics import CounterFactScores

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        state, hparams = ckpt["encore_pl"], ckpt["hyper_parameters"]
    except Exception as e:
        raise ValueError(f"{checkpoint}: not a readable encore-pl checkpoint ({e})") from None
    history = state["history"]
    run = {
        "method": hparams["solver"]["method"], "model": hparams.get("model_name_or_path"), "partial": True,
        "num_edits": len(state["edited"]), "layers": hparams["layers"],
        "batch_size": len(state["edited"]) // max(len(history), 1),
        "seconds_per_edit": sum(b["seconds"] for b in history) / max(len(state["edited"]), 1),
        **{k: state[k] for k in ("history", "retention", "downstream_history", "z_steps", "target_probs", "natural_probs")},
    }
    pre = CounterFactScores()  # the pre-edit scores, from their metric states
    pre.load_state_dict({k.removeprefix("pre_scores."): v for k, v in state["metrics"].items()
                         if k.startswith("pre_scores.")})
    with warnings.catch_warnings():  # states loaded, not updated: torchmetrics would warn
        warnings.simplefilter("ignore")
        run["pre"] = pre.compute()
    if state["retention"] and state["retention"][-1]["num_edits"] == run["num_edits"]:
        run.update({k: v for k, v in state["retention"][-1].items() if k != "num_edits"})
    return run


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

"""scripts/plot_run.py and scripts/compare.py (`encore-pl plot` / `compare`) on two fake runs: an
ENCORE run with every optional key of results.json and a MEMIT run with only the required ones."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).parents[1]
LAYERS = [4, 5, 6, 7, 8]
FIGURES = ["norm_growth.png", "scores.png", "probabilities.png", "z_steps.png", "downstream.png", "mlp_ratio.png",
           "tradeoff.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_results(method: str, full: bool, num_edits: int = 200, batch_size: int = 25, seed: int = 0) -> dict:
    """A results.json as an editing run writes it; `full` adds every optional key."""
    rng = np.random.default_rng(seed)
    growth = {"encore": 0.0004, "alphaedit": 0.003}.get(method, 0.01)  # MEMIT's weights grow the fastest
    drift = 1 + seed  # later seeds forget faster, so that fake runs' curves differ
    original = {l: 170.0 + 2 * i for i, l in enumerate(LAYERS)}
    history = []
    for batch in range(num_edits // batch_size):
        n = (batch + 1) * batch_size
        ratio = {str(l): 1 + growth * n * (1 + 0.2 * i) for i, l in enumerate(LAYERS)}
        entry = {
            "batch": batch, "num_edits": n, "seconds": 80.0 + rng.normal(0, 5),
            "weight_norm": {str(l): original[l] * ratio[str(l)] for l in LAYERS},
            "weight_norm_ratio": ratio,
            "increment_norm": {str(l): 0.3 + 0.01 * n for l in LAYERS},
        }
        if full:
            entry["mlp_residual_ratio"] = {str(l): 0.12 + 0.0002 * drift * n * (i + 1) for i, l in enumerate(LAYERS)}
        history.append(entry)
    results = {
        "method": method, "model": "smollm2-135m", "num_edits": num_edits, "batch_size": batch_size,
        "efficacy_score": 97.0, "paraphrase_score": 85.0, "neighborhood_score": 71.5, "overall_score": 83.1,
        "pre": {"efficacy_score": 20.0, "paraphrase_score": 21.5, "neighborhood_score": 78.0, "overall_score": 28.4},
        "edit_seconds": 700.0, "seconds_per_edit": 3.5, "mean_z_steps": 10.2,
        "weight_norms": {f"model.layers.{l}.mlp.down_proj": [original[l], history[-1]["weight_norm"][str(l)]]
                         for l in LAYERS},
        "layers": LAYERS,
        "history": history,
    }
    if not full:
        results.update(efficacy_score=88.0, paraphrase_score=70.26, neighborhood_score=60.0, overall_score=71.44,
                        seconds_per_edit=1.234, retention=[])
        return results
    results["pre"]["generation_entropy"] = 610.2
    results["generation_entropy"] = 605.1
    results.update(generation_efficacy=61.0, generation_paraphrase=40.5, generation_neighborhood=66.25)
    results["retention"] = [
        {"num_edits": n, "efficacy_score": 99 - drift * n / 100, "paraphrase_score": 90 - drift * n / 40,
         "neighborhood_score": 78 - drift * n / 30, "overall_score": 88 - drift * n / 30,
         "generation_efficacy": 70 - drift * n / 20, "generation_paraphrase": 50 - drift * n / 20,
         "generation_neighborhood": 70 - drift * n / 50}
        for n in range(50, num_edits + 1, 50)
    ]
    results["downstream"] = {"sst2": {"pre": 55.0, "post": 50.0}, "mrpc": {"pre": 62.0, "post": 60.0},
                             "nli": {"pre": 58.0, "post": 55.5}}
    results["downstream_history"] = [
        {"num_edits": n, "sst2": 55.0 - drift * n / 40, "mrpc": 62.0 - drift * n / 100, "nli": 58.0 - drift * n / 80,
         "perplexity": 30.2 + drift * n / 250}
        for n in range(0, num_edits + 1, 50)
    ]
    results["perplexity"] = {"pre": 30.2, "post": 31.0}
    results["target_probs"] = rng.uniform(0.3, 0.95, num_edits).round(4).tolist()
    results["natural_probs"] = rng.beta(0.6, 3.0, num_edits).round(4).tolist()
    results["z_steps"] = rng.integers(4, 20, num_edits).tolist()
    return results


def write_run(directory: Path, results: dict) -> Path:
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    return directory


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{script}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [write_run(root / "encore-200", fake_results("encore", full=True)),
            write_run(root / "memit-200", fake_results("memit", full=False, seed=1))]


def test_plot_run_writes_every_figure(runs, tmp_path):
    out = tmp_path / "figures"
    proc = run_script("plot_run.py", *runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    for name in FIGURES:
        png = out / name
        assert png.is_file(), f"{name} missing; stdout:\n{proc.stdout}"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size > 5_000, f"{name} is suspiciously small"
        assert str(png) in proc.stdout


def test_plot_run_defaults_to_first_run_dir_and_skips_missing_data(runs):
    proc = run_script("plot_run.py", runs[1])  # the MEMIT run has only the history
    assert proc.returncode == 0, proc.stderr
    assert (runs[1] / "norm_growth.png").stat().st_size > 5_000
    for name in FIGURES[1:]:
        assert not (runs[1] / name).exists()
        assert f"skipped {name}" in proc.stdout


def test_tradeoff_points_pair_scores_with_perplexity_at_the_same_edit_count():
    from encore_pl.plots import tradeoff_points

    run = fake_results("encore", full=True)
    run["downstream_history"] = [e for e in run["downstream_history"] if e["num_edits"] != 150]
    run["retention"] = [e for e in run["retention"] if e["num_edits"] != 100]
    points = tradeoff_points(run)  # 0 (pre), 50 and 200: 100 has no scores, 150 no perplexity
    assert [n for n, _, _ in points] == [0, 50, 200]
    assert points[0][1] == 1.0 and points[0][2]["efficacy_score"] == 20.0
    n, ratio, scores = points[-1]  # drift 1: perplexity 30.2 + 0.8, ES 99 - 2
    assert ratio == pytest.approx(31.0 / 30.2) and scores["efficacy_score"] == pytest.approx(97.0)
    assert tradeoff_points(fake_results("memit", full=False)) == []  # no downstream history


def parse_table(text: str) -> list[list[str]]:
    lines = [l for l in text.splitlines() if l.startswith("|")]
    return [[cell.strip() for cell in l.strip("|").split("|")] for l in lines]


def test_compare_prints_one_row_per_run(runs, tmp_path):
    out = tmp_path / "table.md"
    proc = run_script("compare.py", *runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    header, rule, *rows = parse_table(proc.stdout)
    assert header == ["method", "edits", "ES", "PS", "NS", "Overall", "gen ES", "gen PS", "gen NS",
                      "Generation Entropy", "downstream mean", "perplexity", "s/edit"]
    assert set(rule[0]) <= {":", "-"}
    assert rows == [
        # downstream mean = mean(50.0, 60.0, 55.5) = 55.17
        ["encore", "200", "97.0", "85.0", "71.5", "83.1", "61.0", "40.5", "66.2", "605.1", "55.2", "31.00", "3.50"],
        ["memit", "200", "88.0", "70.3", "60.0", "71.4", "–", "–", "–", "–", "–", "–", "1.23"],
    ]
    assert parse_table(out.read_text()) == [header, rule, *rows]


def test_compare_at_reads_the_retention_curve_and_downstream_history(runs):
    proc = run_script("compare.py", runs[0], "--at", 100)
    assert proc.returncode == 0, proc.stderr
    [row] = parse_table(proc.stdout)[2:]
    history = json.loads((runs[0] / "results.json").read_text())["history"]
    seconds = sum(b["seconds"] for b in history[:4]) / 100  # the first 4 batches of 25
    # retention at 100 edits (drift 1): 99 - 1, 90 - 2.5, 78 - 3.33, 88 - 3.33, 70 - 5, 50 - 5, 70 - 2;
    # downstream at 100: mean(52.5, 61, 56.75); perplexity 30.2 + 0.4; no Generation Entropy mid-run
    assert row == ["encore", "100", "98.0", "87.5", "74.7", "84.7", "65.0", "45.0", "68.0", "–", "56.8", "30.60",
                   f"{seconds:.2f}"]
    last = run_script("compare.py", runs[0], "--at", 200)  # the run's end: its final results
    assert parse_table(last.stdout)[2][2:6] == ["97.0", "85.0", "71.5", "83.1"]


def test_compare_at_the_last_edits_of_a_partial_run_reads_its_downstream_history():
    from encore_pl.compare import at_edits, table_row

    run = fake_results("encore", full=True)
    for final in ("downstream", "perplexity", "generation_entropy"):  # what only a finished run has
        del run[final]
    run["partial"] = True  # as reports.run_so_far reads a run from its last checkpoint
    row = table_row("encore", at_edits(run, 200))
    # downstream at 200 (drift 1): mean(55 - 5, 62 - 2, 58 - 2.5); perplexity 30.2 + 0.8
    assert row[10:12] == ["55.2", "31.00"]
    assert row[2:5] == ["97.0", "85.0", "71.3"]  # the retention point at 200 (final NS: 71.5)


def test_compare_at_the_last_edits_of_a_partial_run_without_its_retention_point_names_what_it_has():
    from encore_pl.compare import at_edits

    run = fake_results("encore", full=True)
    run["partial"], run["num_edits"] = True, 250  # checkpointed after batch 250, not yet scored there
    with pytest.raises(ValueError, match=r"no scores at 250 edits \(it has scores at 50, 100, 150, 200 edits;"):
        at_edits(run, 250)


def test_compare_at_an_edit_count_without_scores_exits_2(runs):
    proc = run_script("compare.py", runs[0], runs[1], "--at", 75)
    assert proc.returncode == 2
    assert f"{runs[0]}: no scores at 75 edits" in proc.stderr and "50, 100, 150, 200" in proc.stderr


def test_compare_names_the_run_dir_when_a_method_repeats(runs, tmp_path):
    again = write_run(tmp_path / "encore-again", fake_results("encore", full=False))
    proc = run_script("compare.py", runs[0], again)
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in parse_table(proc.stdout)[2:]] == ["encore (encore-200)", "encore (encore-again)"]


@pytest.mark.parametrize("script", ["compare.py", "plot_run.py"])
def test_missing_results_exits_2_naming_the_path(runs, tmp_path, script):
    empty = tmp_path / "no-results-here"
    empty.mkdir()
    proc = run_script(script, runs[0], empty)
    assert proc.returncode == 2
    assert str(empty / "results.json") in proc.stderr


def test_invalid_json_exits_2_naming_the_path(tmp_path):
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "results.json").write_text('{"method": "encore", ')
    proc = run_script("compare.py", broken)
    assert proc.returncode == 2
    assert str(broken / "results.json") in proc.stderr
    assert "invalid JSON" in proc.stderr


def test_encore_pl_command_runs_the_same_code_as_the_scripts(runs, tmp_path):
    def encore_pl(*args):
        return subprocess.run([sys.executable, "-m", "encore_pl", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    proc = encore_pl("compare", *runs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == run_script("compare.py", *runs).stdout
    proc = encore_pl("plot", runs[0], "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(FIGURES)
    assert "usage: encore-pl compare" in encore_pl("compare", "--help").stdout
    listing = encore_pl("--help")
    assert listing.returncode == 0
    for name in ("fit", "validate", "patch", "benchmark", "plot", "compare"):  # one line each
        assert re.search(rf"^ +{name} +[A-Z].*\.$", listing.stdout, re.M), listing.stdout
    assert encore_pl("nope").returncode == 2

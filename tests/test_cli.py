"""The entry point on a tiny model: fit writes results, config and TensorBoard logs; validate scores."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DOWNSTREAM, REPO, SHARED_DATA

RESULT_KEYS = {
    "method", "model", "num_edits", "batch_size", "efficacy_score", "paraphrase_score", "neighborhood_score",
    "overall_score", "pre", "edit_seconds", "seconds_per_edit", "mean_z_steps", "weight_norms",
}


def run(*args, cwd):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("method", ["encore", "memit", "alphaedit"])
def test_fit_on_tiny_model_writes_results(tiny_llama_dir, tmp_path, method, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    extra = []
    if method == "encore":  # with downstream tasks, perplexity, figures and the table
        if not (SHARED_DATA / "encore-eval").exists():
            pytest.skip(f"shared evaluation data not found under {SHARED_DATA}")
        config = tmp_path / "downstream.yaml"
        config.write_text(DOWNSTREAM.format(glue=SHARED_DATA / "encore-eval" / "glue_eval",
                                            text=SHARED_DATA / "wikitext-2-pytorch-examples" / "valid.txt"))
        extra = ["--config", str(config)]
    proc = run(
        "fit", f"--model.model_name_or_path={tiny_llama_dir}", "--model.layers=[1,2]",
        f"--model.solver.method={method}", "--model.solver.lambda_p=10", "--model.target.v_num_grad_steps=4",
        "--model.key_stats.num_tokens=1024", "--model.key_stats.seq_len=64",
        "--data.num_edits=6", "--data.batch_size=3", f"--trainer.default_root_dir={tmp_path}",
        "--model.evaluation.every_n_batches=1", "--model.evaluation.generation_prompts=2",
        "--model.evaluation.generation_length=20", *extra,
        cwd=tmp_path,
    )
    run_dir = tmp_path / "lightning_logs" / "version_0"
    results = json.loads((run_dir / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["method"] == method and results["num_edits"] == 6 and results["batch_size"] == 3
    scores = {"efficacy_score", "paraphrase_score", "neighborhood_score", "overall_score", "efficacy_magnitude",
              "paraphrase_magnitude", "neighborhood_magnitude", "generation_efficacy", "generation_paraphrase",
              "generation_neighborhood"}
    assert scores <= set(results["pre"]) and scores <= set(results) and scores <= set(results["retention"][-1])
    assert results["data"] == {"path": None, "order": "file", "seed": 0, "unique_subjects": False,
                               "repeated_subjects_left_out": 0, "invalid_records_skipped": 0}
    # The run's history: one record per batch, the retention curve every batch, per-request lists.
    assert [h["num_edits"] for h in results["history"]] == [3, 6]
    assert set(results["history"][0]["mlp_residual_ratio"]) == {"1", "2"}
    assert [r["num_edits"] for r in results["retention"]] == [3, 6]
    assert len(results["z_steps"]) == len(results["target_probs"]) == len(results["natural_probs"]) == 6
    assert results["generation_entropy"] > 0 and results["pre"]["generation_entropy"] > 0
    norms = results["weight_norms"]
    assert set(norms) == {"model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"}
    assert all(before != after for before, after in norms.values())  # the weights were edited
    if extra:  # downstream before the first batch and after each of the two
        assert [p["num_edits"] for p in results["downstream_history"]] == [0, 3, 6]
        assert set(results["downstream"]) == {"sst2", "mmlu"} and 0 <= results["downstream"]["sst2"]["post"] <= 100
        assert results["perplexity"]["pre"] > 1
        # figures and the comparison table from this run's output
        out = tmp_path / "figures"
        subprocess.run([sys.executable, str(REPO / "scripts" / "plot_run.py"), str(run_dir), "--out", str(out)], check=True)
        for name in ("norm_growth", "scores", "probabilities", "z_steps", "downstream", "mlp_ratio"):
            assert (out / f"{name}.png").stat().st_size > 5000, name
        table = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(run_dir)],
                               check=True, capture_output=True, text=True).stdout
        assert "| encore" in table and f"{results['efficacy_score']:.1f}" in table
    assert (run_dir / "config.yaml").exists()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "post-edit" in proc.stdout and "results.json" in proc.stdout


def test_validate_scores_without_editing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    proc = run(
        "validate", f"--model.model_name_or_path={tiny_llama_dir}", "--model.layers=[1,2]",
        "--data.num_edits=4", "--data.batch_size=2", f"--trainer.default_root_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert "val/efficacy_score" in proc.stdout


CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "fit", "--config", config, "--print_config"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "solver:" in proc.stdout and "method:" in proc.stdout


def test_bad_config_key_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "fit", "--config", "configs/quickstart.yaml", "--model.solver.lamda_p=3"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "lamda_p" in proc.stderr


def test_the_installed_command_lists_its_subcommands():
    """`make venv` installs the package with its console script `encore-pl` next to the interpreter."""
    command = Path(sys.executable).parent / "encore-pl"
    assert command.is_file(), f"{command} missing: is the package installed (pip install -e .)?"
    proc = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "patch", "benchmark", "plot", "compare"):
        assert any(line.split()[:1] == [sub] for line in proc.stdout.splitlines()), proc.stdout

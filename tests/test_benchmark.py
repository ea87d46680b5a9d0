"""scripts/benchmark.py on a tiny model: the three paths, their figures, and the JSON line."""

import json
import subprocess
import sys

from conftest import REPO

TINY_ARGS = ["--model.layers=[1,2]", "--model.solver.lambda_p=10", "--model.target.v_num_grad_steps=4",
             "--model.key_stats.num_tokens=1024", "--model.key_stats.seq_len=64", "--data.num_edits=4",
             "--trainer.enable_progress_bar=false"]


def benchmark(model_dir, tmp_path, *args) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), f"--model.model_name_or_path={model_dir}",
                           *TINY_ARGS, "--matmul-seconds=0.2", "--json", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**__import__("os").environ, "ENCORE_PL_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_benchmark_runs_three_paths_on_the_same_requests(tiny_llama_dir, tmp_path):
    result, out = benchmark(tiny_llama_dir, tmp_path, "--data.batch_size=2")
    for path in ("float32", "bfloat16", "reference"):
        assert result[f"{path}_seconds_per_edit"] > 0
        assert set(result[f"{path}_scores"]) >= {"efficacy_score", "paraphrase_score", "neighborhood_score"}
        assert 0 < result[f"{path}_matmul_fraction"] < 10
        assert len(result["paths"][path]["z_steps"]) == result["num_edits"] == 4
    # the batched float32 path is the reference computation made fast: the same stop steps and scores
    assert result["paths"]["float32"]["z_steps"] == result["paths"]["reference"]["z_steps"]
    for key, value in result["float32_scores"].items():
        assert abs(value - result["reference_scores"][key]) < 1e-6, key
    same = [a == b for a, b in zip(result["paths"]["float32"]["z_steps"], result["paths"]["bfloat16"]["z_steps"])]
    assert result["bfloat16_same_stop_steps"] == sum(same) / 4
    assert result["matmul_gflops"]["float32"] > 0 and result["matmul_gflops"]["bfloat16"] > 0
    assert "MPES under bfloat16" in out and "peak memory" in out


def test_benchmark_sweeps_batch_sizes(tiny_llama_dir, tmp_path):
    result, out = benchmark(tiny_llama_dir, tmp_path, "--batch-sizes", "2", "4")
    assert set(result["batch_sizes"]) == {"2", "4"}
    assert all(r["seconds_per_edit"] > 0 for r in result["batch_sizes"].values())

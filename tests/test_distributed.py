"""Two CPU processes (gloo) edit exactly as one: same weights, same scores, same C0."""

import json
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO, SHARED_DATA
from test_cli import DOWNSTREAM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(model_dir, root, devices: int, cache) -> dict:
    args = [
        sys.executable, str(REPO / "scripts" / "train.py"), "fit", f"--model.model_name_or_path={model_dir}",
        "--model.layers=[1,2]", "--model.solver.lambda_p=0.01", "--model.solver.lambda_n=0.01", "--model.target.v_num_grad_steps=6",
        "--model.key_stats.num_tokens=700", "--model.key_stats.seq_len=64", "--model.key_stats.batch_size=3",
        "--model.evaluation.generation_prompts=3", "--model.evaluation.generation_length=16",
        "--model.evaluation.every_n_batches=1",
        "--data.num_edits=5", "--data.batch_size=3",  # 2 sequential batches: 3 then 2 requests
        f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
    ]
    if devices > 1:
        args.append("--trainer.strategy=ddp")
    if (SHARED_DATA / "encore-eval").exists():  # few-shot tasks and perplexity, split over the processes too
        config = root / "downstream.yaml"
        config.write_text(DOWNSTREAM.format(glue=SHARED_DATA / "encore-eval" / "glue_eval",
                                            text=SHARED_DATA / "wikitext-2-pytorch-examples" / "valid.txt"))
        args += ["--config", str(config)]
    env = {**__import__("os").environ, "ENCORE_PL_CACHE": str(cache), "MASTER_PORT": str(free_port())}
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "lightning_logs" / "version_0"
    results = json.loads((run_dir / "results.json").read_text())
    results["patch"] = load_file(run_dir / "edits.safetensors")
    results["c0"] = {p.name.split("-")[2]: load_file(p)["c0"] for p in (cache / "stats").glob("*.safetensors")}
    return results


def test_two_processes_edit_exactly_as_one(tiny_llama_dir, tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = fit(tiny_llama_dir, tmp_path / "one", 1, tmp_path / "cache-one")
    two = fit(tiny_llama_dir, tmp_path / "two", 2, tmp_path / "cache-two")
    # C0: the corpus sharded over the processes, the sums reduced, the cache written once
    assert set(one["c0"]) == set(two["c0"]) == {"layer1", "layer2"}
    for layer in one["c0"]:
        torch.testing.assert_close(two["c0"][layer], one["c0"][layer], atol=1e-6, rtol=1e-5)
    # the same edited weights
    assert set(one["patch"]) == set(two["patch"]) and len(one["patch"]) == 2
    for name, inc in one["patch"].items():
        assert inc.abs().max() > 1e-2  # something was edited
        assert (two["patch"][name] - inc).abs().max() <= 1e-5
    # every request edited once, in order; the same scores and per-request records
    assert one["num_edits"] == two["num_edits"] == 5
    assert [h["num_edits"] for h in two["history"]] == [3, 5]
    assert one["z_steps"] == two["z_steps"]
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "generation_entropy"):
        assert abs(one[key] - two[key]) < 1e-6, key
        assert abs(one["pre"][key] - two["pre"][key]) < 1e-6, key
    assert max(abs(a - b) for a, b in zip(one["natural_probs"], two["natural_probs"])) < 1e-6
    assert [r["num_edits"] for r in two["retention"]] == [3, 5]
    if (SHARED_DATA / "encore-eval").exists():  # the same F1s and perplexity, before the first batch and after each
        assert [p["num_edits"] for p in two["downstream_history"]] == [0, 3, 5]
        for a, b in zip(one["downstream_history"], two["downstream_history"]):
            assert a["sst2"] == b["sst2"] and a["mmlu"] == b["mmlu"]
            assert abs(a["perplexity"] - b["perplexity"]) <= 1e-5 * a["perplexity"]
    assert abs(one["retention"][0]["efficacy_score"] - two["retention"][0]["efficacy_score"]) < 1e-6

"""Two CPU processes (gloo) edit exactly as one: same weights, same scores, same C0; a failure on one
process ends them all; processes that loaded different base weights refuse to edit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DOWNSTREAM, REPO, SHARED_DATA, free_port

TESTS = Path(__file__).parent


def run(args: list, cwd, env: dict, timeout: float) -> tuple[int, str, str, float]:
    """Run a command in a session of its own; on timeout kill every process of it (Lightning's
    launcher starts the other processes as its children), so that a hang fails the test."""
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)  # returns once every process has closed the pipes
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    seconds = time.monotonic() - start
    kill_session(proc.pid)  # anything left without output (the test callback's connection holder)
    return proc.returncode, out, err, seconds


def kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def train_args(model_dir, root, devices: int, downstream: bool = True) -> list:
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
    if downstream:  # few-shot tasks and perplexity, split over the processes too
        if not (SHARED_DATA / "encore-eval").exists():
            pytest.skip(f"shared evaluation data not found under {SHARED_DATA}")
        config = root / "downstream.yaml"
        config.write_text(DOWNSTREAM.format(glue=SHARED_DATA / "encore-eval" / "glue_eval",
                                            text=SHARED_DATA / "wikitext-2-pytorch-examples" / "valid.txt"))
        args += ["--config", str(config)]
    return args


def train_env(cache, test_callbacks: bool = False) -> dict:
    """The environment of a run; with `test_callbacks`, tests/ on PYTHONPATH (failing_callback.py)."""
    env = {**os.environ, "ENCORE_PL_CACHE": str(cache), "MASTER_PORT": str(free_port())}
    if test_callbacks:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return env


def fit(model_dir, root, devices: int, cache) -> dict:
    code, out, err, _ = run(train_args(model_dir, root, devices), root, train_env(cache), timeout=600)
    assert code == 0, out[-3000:] + err[-3000:]
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
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "generation_entropy",
                "generation_efficacy", "generation_paraphrase", "generation_neighborhood"):
        assert abs(one[key] - two[key]) < 1e-6, key
        assert abs(one["pre"][key] - two["pre"][key]) < 1e-6, key
    assert max(abs(a - b) for a, b in zip(one["natural_probs"], two["natural_probs"])) < 1e-6
    assert [r["num_edits"] for r in two["retention"]] == [3, 5]
    # the same F1s and perplexity, before the first batch and after each
    assert [p["num_edits"] for p in two["downstream_history"]] == [0, 3, 5]
    for a, b in zip(one["downstream_history"], two["downstream_history"]):
        assert a["sst2"] == b["sst2"] and a["mmlu"] == b["mmlu"]
        assert abs(a["perplexity"] - b["perplexity"]) <= 1e-5 * a["perplexity"]
    assert abs(one["retention"][0]["efficacy_score"] - two["retention"][0]["efficacy_score"]) < 1e-6


@pytest.mark.parametrize("failing", [1, 0])
def test_a_failure_on_one_process_ends_every_process(tiny_llama_dir, tmp_path, failing):
    """One process raises as the second edit batch starts while the other waits in that batch's
    collectives: both end within seconds (not at the 30 min collective timeout), not with 0, and the
    failing process's error is shown, by itself and by the other process. The failing process's
    connections stay open (as a dead NCCL peer's often seem to), so only the failure watch can end the
    other process: without it gloo would wait for the failed process's data until its timeout."""
    callback = json.dumps({"class_path": "failing_callback.FailOnProcess",
                           "init_args": {"rank": failing, "batch": 1, "hold_connections": 600}})
    args = train_args(tiny_llama_dir, tmp_path, 2, downstream=False) + [f"--trainer.callbacks+={callback}"]
    env = train_env(tmp_path / "cache", test_callbacks=True)
    code, out, err, seconds = run(args, tmp_path, env, timeout=120)
    assert code != 0, out[-3000:] + err[-3000:]
    assert f"ValueError: test failure on process {failing} at edit batch 1" in err, err[-3000:]  # its own traceback
    # the other process's failure watch: one line, which process, what error
    assert f"encore-pl: error: process {failing} failed: ValueError: test failure on process {failing}" in err, err[-3000:]
    assert "results.json" not in out  # nobody went on to the end
    print(f"process {failing} failed: the run ended after {seconds:.1f} s")


def test_processes_with_other_base_weights_refuse_to_edit(tiny_llama_dir, tmp_path):
    """Process 1 holds other base weights (as a node with another model revision would): every process
    stops at the start of fit, with one line naming it."""
    callback = json.dumps({"class_path": "failing_callback.OtherBaseOnProcess", "init_args": {"rank": 1}})
    args = train_args(tiny_llama_dir, tmp_path, 2, downstream=False) + [f"--trainer.callbacks+={callback}"]
    env = train_env(tmp_path / "cache", test_callbacks=True)
    code, out, err, _ = run(args, tmp_path, env, timeout=120)
    assert code == 1, out[-3000:] + err[-3000:]
    assert "encore-pl: error: " in err and "process 1 loaded different base model weights than process 0 ('" + "0" * 64 in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "cache" / "stats").exists() or not list((tmp_path / "cache" / "stats").glob("*"))  # before C0


def two_processes(*args: str, values: tuple = ("", "")) -> list[tuple[int, str, float]]:
    """(exit code, output, seconds) of each of 2 gloo processes running tests/gloo_worker.py; process
    i gets `values[i]` as its last argument."""
    port, procs, start = free_port(), [], time.monotonic()
    for rank, value in enumerate(values):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "gloo_worker.py"), *args, *filter(None, [value])],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                kill_session(p.pid)
            pytest.fail(f"{args} hung")
        results.append((proc.returncode, out, time.monotonic() - start))
    return results


def test_require_same_passes_when_every_process_agrees():
    sha = "a" * 64
    assert [code for code, _, _ in two_processes("require_same", values=(sha, sha))] == [0, 0]


def test_require_same_raises_on_every_process_when_one_differs():
    for code, out, _ in two_processes("require_same", values=("a" * 64, "b" * 64)):
        assert code == 3, out  # both raise: neither waits for the other in vain
        assert "process 1 loaded different base model weights than process 0" in out, out
        assert "'" + "b" * 64 + "' on process 1" in out and "'" + "a" * 64 + "' on process 0" in out, out


def test_failure_watch_lets_a_clean_end_end_cleanly():
    """Process 0 (hosting the store) finishes 3 s before process 1: it waits for it, and neither takes
    the other's end for a failure."""
    (code0, out0, _), (code1, out1, _) = two_processes("watch", "clean")
    assert code0 == code1 == 0, out0 + out1
    assert "encore-pl: error" not in out0 + out1, out0 + out1
    assert float(out0.split("after ")[1].split(" s")[0]) >= 2.5  # process 0 waited for process 1


def test_failure_watch_ends_a_process_stuck_while_another_fails():
    (code0, out0, seconds0), (code1, out1, _) = two_processes("watch", "raise1")
    assert code1 == 2 and code0 == 1, out0 + out1
    assert "encore-pl: error: process 1 failed: ValueError: disk full\n" in out0, out0
    assert "was not ended" not in out0 and seconds0 < 30


def test_failure_watch_ends_a_stuck_process_when_the_store_host_is_killed():
    (code0, out0, _), (code1, out1, seconds1) = two_processes("watch", "killed0")
    assert code0 == -9 and code1 == 1, out0 + out1
    assert "encore-pl: error: lost contact with the process group's store (process 0 or torchrun's agent ended)" in out1, out1
    assert "was not ended" not in out1 and seconds1 < 30

"""Lifelong state: a killed run resumes to the same weights; patches apply, revert and refuse the wrong base;
non-finite numbers are rejected without touching the weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, free_port, make_tiny_model

FIT = [
    "--model.layers=[1,2]", "--model.solver.lambda_p=0.01", "--model.solver.lambda_n=0.01", "--model.target.v_num_grad_steps=6",
    "--model.key_stats.num_tokens=1024", "--model.key_stats.seq_len=64",
    "--data.num_edits=8", "--data.batch_size=2",  # 4 sequential batches
    "--trainer.accelerator=cpu", "--checkpoint.every_n_batches=1",
]


def train(model_dir, root, *extra, env):
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "fit", f"--model.model_name_or_path={model_dir}", *FIT,
           f"--trainer.default_root_dir={root}", *extra]
    log = open(root / f"log-{len(list(root.glob('log-*')))}.txt", "w+")  # a file: a full pipe would stall the run
    # a session of its own: SIGKILL to the group kills every process of a multi-process run
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log = log
    return proc


def kill_after_first_checkpoint(proc, root) -> int:
    """SIGKILL the run (all its processes) as soon as its first checkpoint exists; how many requests it holds."""
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "lightning_logs" / "version_0" / "results.json").exists()
    done = len(torch.load(ckpt, weights_only=True)["encore_pl"]["edited"])
    assert 2 <= done < 8, "the run should have been killed in the middle"
    return done


def finish(proc) -> str:
    proc.wait(timeout=600)
    proc.log.seek(0)
    out = proc.log.read()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """An uninterrupted run, and a run killed with SIGKILL after its first checkpoint and resumed."""
    root = tmp_path_factory.mktemp("lifelong")
    env = {**os.environ, "ENCORE_PL_CACHE": str(root / "cache")}
    whole, killed = root / "whole", root / "killed"
    whole.mkdir(), killed.mkdir()
    finish(train(tiny_llama_dir, whole, env=env))

    killed_after = kill_after_first_checkpoint(train(tiny_llama_dir, killed, env=env), killed)
    resumed_out = finish(train(tiny_llama_dir, killed, "--ckpt_path=last", env=env))
    return {"whole": whole / "lightning_logs" / "version_0", "killed": killed / "lightning_logs" / "version_0",
            "killed_after": killed_after, "resumed_out": resumed_out, "env": env, "root": root}


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(runs):
    whole, killed = runs["whole"], runs["killed"]
    assert not list(killed.parent.glob("version_1")), "the resumed run writes into the killed run's directory"
    assert "weights_only" not in runs["resumed_out"], "checkpoints are saved and loaded without a note about it"
    a, b = load_file(whole / "edits.safetensors"), load_file(killed / "edits.safetensors")
    assert set(a) == set(b) and len(a) == 2
    for name in a:
        assert a[name].abs().max() > 1e-3
        assert (a[name] - b[name]).abs().max() <= 1e-7, name
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (whole, killed))
    # no request lost, none applied twice; the records and scores carried over
    assert ra["num_edits"] == rb["num_edits"] == 8
    assert [h["num_edits"] for h in rb["history"]] == [2, 4, 6, 8]
    assert ra["z_steps"] == rb["z_steps"] and ra["natural_probs"] == rb["natural_probs"]
    assert ra["context_prefixes"] == rb["context_prefixes"]
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score"):
        assert abs(ra[key] - rb[key]) < 1e-9 and abs(ra["pre"][key] - rb["pre"][key]) < 1e-9


def test_checkpoint_holds_only_the_lifelong_state(runs):
    state = torch.load(runs["whole"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(state["state_dict"]) == {"increment_1", "increment_2", "prev_keys_1", "prev_keys_2"}
    patch = load_file(runs["whole"] / "edits.safetensors")  # the cumulative increments are the patch
    assert torch.equal(state["state_dict"]["increment_1"], patch["model.layers.1.mlp.down_proj"])
    assert state["state_dict"]["prev_keys_1"].dtype == torch.float64 and state["state_dict"]["prev_keys_1"].abs().max() > 0
    assert len(state["encore_pl"]["edited"]) == 8 and state["encore_pl"]["context_prefixes"]


def test_resuming_a_finished_run_edits_nothing_again(runs, tiny_llama_dir):
    whole = runs["whole"]
    before = load_file(whole / "edits.safetensors")
    out = finish(train(tiny_llama_dir, whole.parents[1], "--ckpt_path=last", env=runs["env"]))
    after = load_file(whole / "edits.safetensors")
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert json.loads((whole / "results.json").read_text())["num_edits"] == 8, out[-2000:]


def patch_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "patch.py"), *map(str, args)], capture_output=True, text=True)


def test_patch_apply_then_revert_restores_the_base(runs, tiny_llama_dir, tmp_path):
    patch = runs["whole"] / "edits.safetensors"
    proc = patch_cli("apply", "--model", tiny_llama_dir, "--patch", patch, "--output", tmp_path / "edited")
    assert proc.returncode == 0, proc.stderr
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    increments = torch.load(runs["whole"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        # the exported model carries the run's edited weights: base + cumulative increment, bit for bit
        assert torch.equal(edited.get_parameter(name), base.get_parameter(name) + increments[f"increment_{layer}"])
        assert (edited.get_parameter(name) - base.get_parameter(name)).abs().max() > 1e-3
    proc = patch_cli("revert", "--model", tmp_path / "edited", "--patch", patch, "--output", tmp_path / "reverted")
    assert proc.returncode == 0, proc.stderr
    reverted = AutoModelForCausalLM.from_pretrained(tmp_path / "reverted")
    for name, p in base.named_parameters():
        torch.testing.assert_close(reverted.get_parameter(name), p, atol=1e-6, rtol=0)


def test_patch_refuses_the_wrong_base(runs, tiny_llama_dir, tmp_path):
    patch = runs["whole"] / "edits.safetensors"
    other = make_tiny_model("llama", tmp_path / "other", seed=1)
    proc = patch_cli("apply", "--model", other, "--patch", patch, "--output", tmp_path / "out")
    assert proc.returncode == 1 and "refusing to apply the patch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = patch_cli("revert", "--model", tiny_llama_dir, "--patch", patch, "--output", tmp_path / "out")
    assert proc.returncode == 1 and "refusing to revert the patch" in proc.stderr


def test_two_processes_killed_and_resumed_match_one_uninterrupted(runs, tiny_llama_dir):
    root = runs["root"] / "ddp"
    root.mkdir()
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**runs["env"], "MASTER_PORT": str(free_port())}
    kill_after_first_checkpoint(train(tiny_llama_dir, root, *ddp, env=env), root)
    finish(train(tiny_llama_dir, root, *ddp, "--ckpt_path=last", env={**env, "MASTER_PORT": str(free_port())}))
    run = root / "lightning_logs" / "version_0"
    a, b = load_file(runs["whole"] / "edits.safetensors"), load_file(run / "edits.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5, name  # 2 processes vs 1: see test_distributed
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (runs["whole"], run))
    assert [h["num_edits"] for h in rb["history"]] == [2, 4, 6, 8] and ra["z_steps"] == rb["z_steps"]
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score"):  # metric sums restored once, not per process
        assert abs(ra[key] - rb[key]) < 1e-6 and abs(ra["pre"][key] - rb["pre"][key]) < 1e-6

"""End to end on the real default model (SmolLM2-135M-Instruct) and the shared CounterFact data."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA
from encore_pl.data import QUICKSTART_PATH, read_requests
from encore_pl.evaluation import score_requests
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer

pytestmark = pytest.mark.e2e
EDIT_SPLIT = SHARED_DATA / "counterfact-easyedit-splits" / "counterfact-edit.json"


@pytest.fixture(scope="module")
def default_model():
    model, tok = load_model_and_tokenizer("smollm2-135m")
    return LocatedModel(model), tok


def test_default_model_loads_and_knows_a_fact(default_model):
    lm, tok = default_model
    assert lm.model.config.model_type == "llama" and lm.num_layers == 30
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = lm.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_shipped_quickstart_facts_are_known_to_the_unedited_model(default_model):
    lm, tok = default_model
    requests, _ = read_requests(QUICKSTART_PATH)
    scores = score_requests(lm, tok, requests)
    # The unedited model prefers the true object on every rewrite prompt and every neighbour.
    assert scores["efficacy"].sum().item() == 0
    assert torch.all(scores["neighborhood"] == 1.0)


def test_encore_edits_ten_counterfact_requests(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "fit", "--config", "configs/smollm2-135m/encore.yaml",
         f"--data.path={EDIT_SPLIT}", "--data.format=easyedit", "--data.num_edits=10", "--data.batch_size=5",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "lightning_logs" / "version_0" / "results.json").read_text())
    for key in ("method", "model", "num_edits", "batch_size", "efficacy_score", "paraphrase_score",
                "neighborhood_score", "overall_score", "pre", "edit_seconds", "seconds_per_edit",
                "mean_z_steps", "weight_norms"):
        assert key in results, key
    assert results["num_edits"] == 10 and results["batch_size"] == 5 and results["method"] == "encore"
    assert results["pre"]["efficacy_score"] < 50
    assert results["efficacy_score"] >= 90
    assert len(results["weight_norms"]) == len(results["layers"])

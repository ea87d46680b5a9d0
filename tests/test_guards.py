"""Guards: non-finite numbers leave the weights as they were; bad input is one clear message."""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

import encore_pl.editor
from encore_pl.update import spread_update
from encore_pl.cli import main
from encore_pl.datamodule import EditDataModule
from encore_pl.edited import EditedLayers
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer
from encore_pl.module import KnowledgeEditor
from encore_pl.stats import KeyStatistics
from conftest import REPO, make_tiny_model


class Snapshot(L.Callback):
    """The edited weights before every batch (a callback sees a batch's update from the start of
    the next one: the update itself runs in on_train_batch_end, after the user's callbacks)."""

    def __init__(self):
        self.weights = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append({l: pl_module.lm.weight_out_in(l).detach().clone() for l in pl_module.layers})


def poisoned(bad_id: str):
    """compute_target_vectors, with a NaN target vector for request `bad_id`."""
    real = encore_pl.editor.compute_target_vectors

    def optimise(lm, tok, requests, *args):
        out = real(lm, tok, requests, *args)
        for i, r in enumerate(requests):
            if r.case_id == bad_id:
                out.z[i, 0] = float("nan")
        return out

    return optimise


def edit(model_dir, on_nonfinite, tmp_path):
    module = KnowledgeEditor(str(model_dir), layers=[1, 2], on_nonfinite=on_nonfinite,
                             key_stats=KeyStatistics(num_tokens=1024, seq_len=64))
    data = EditDataModule(num_edits=4, batch_size=2)
    snapshot = Snapshot()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
                        callbacks=[snapshot], default_root_dir=tmp_path)
    return module, data, snapshot, trainer


def test_injected_nan_is_rejected_without_changing_the_weights(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    data = EditDataModule(num_edits=4, batch_size=2)
    data.setup("fit")
    bad = data.requests[3].case_id  # in the second batch
    monkeypatch.setattr(encore_pl.editor, "compute_target_vectors", poisoned(bad))
    module, data, snapshot, trainer = edit(tiny_llama_dir, "error", tmp_path)
    with pytest.raises(FloatingPointError, match=rf"edit batch 1: non-finite target vector \(requests \['{bad}'\]\); the weights are as they were"):
        trainer.fit(module, data)
    assert len(snapshot.weights) == 2 and len(module.edited) == 2  # before batch 0, before batch 1
    for l, w in snapshot.weights[1].items():
        assert torch.equal(module.lm.weight_out_in(l), w)

    # skip: the request is left out and listed; the rest of the batch is edited
    module, data, snapshot, trainer = edit(tiny_llama_dir, "skip", tmp_path)
    trainer.fit(module, data)
    assert [r["case_id"] for r in module.skipped] == [bad] and len(module.edited) == 3
    assert bad not in [r.case_id for r in module.edited]
    assert not torch.equal(module.lm.weight_out_in(1), snapshot.weights[1][1])


def test_non_finite_update_of_a_later_layer_undoes_the_earlier_ones(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    data = EditDataModule(num_edits=2)
    data.setup("fit")
    edited = EditedLayers(lm, [1, 2])
    before = {l: lm.weight(l).detach().clone() for l in (1, 2)}

    def solve(layer, resid, k):
        d = resid @ k.T * 0.01
        return d * float("nan") if layer == 2 else d

    z = torch.randn(2, model.config.hidden_size)
    with pytest.raises(FloatingPointError, match="the update of layer 2 is not finite"):
        spread_update(edited, tok, data.requests, ["Hello. "], 2, z, solve)
    for l, w in before.items():
        assert torch.equal(lm.weight(l), w)
        assert not edited.increment(l).any()  # the cumulative increment too


def bad_inputs(tmp, model_dir):
    """(arguments, expected message) for each kind of bad input."""
    good = json.loads((REPO / "encore_pl" / "assets" / "quickstart_facts.json").read_text())[:2]
    (tmp / "not.json").write_text("[{]")
    missing = json.loads(json.dumps(good))
    del missing[0]["requested_rewrite"]["subject"]
    (tmp / "missing.json").write_text(json.dumps(missing))
    wrong_type = json.loads(json.dumps(good))
    wrong_type[1]["requested_rewrite"]["target_new"]["str"] = 7
    (tmp / "type.json").write_text(json.dumps(wrong_type))
    (tmp / "dup.json").write_text(json.dumps([good[0], good[0]]))
    (tmp / "empty.json").write_text("[]")
    corrupt = tmp / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    m = f"--model.model_name_or_path={model_dir}"
    return [
        (["--data.path", str(tmp / "nope.json")], "data file"),
        (["--data.path", str(tmp / "not.json")], "not valid JSON"),
        (["--data.path", str(tmp / "missing.json")], "record 0 (id 0): missing field 'requested_rewrite.subject'"),
        (["--data.path", str(tmp / "type.json")], "record 1 (id 1): field 'requested_rewrite.target_new.str' must be a string, got int"),
        (["--data.path", str(tmp / "dup.json")], "duplicate id"),
        (["--data.path", str(tmp / "empty.json"), "--data.num_edits=1"], "asked for 1 edits but only 0 valid records"),
        (["--model.solver.lamda_p=3"], "lamda_p"),
        (["--data.batch_size=many"], "batch_size"),
        (["--model.model_name_or_path", str(tmp / "no-model")], "does not exist"),
        (["--model.layers=[1,3]"], "consecutive layers"),
        (["--model.layers=[3,4]"], "out of range"),
        (["--ckpt_path", str(corrupt)], "cannot be read"),
        (["--ckpt_path", str(tmp / "none.ckpt")], "does not exist"),
        (["--ckpt_path", "last"], "no last.ckpt"),
    ], m


def test_bad_input_is_one_clear_message(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cases, model = bad_inputs(tmp_path, tiny_llama_dir)
    for args, message in cases:
        full = ["fit", model, "--model.layers=[1,2]", "--model.key_stats.num_tokens=1024", "--model.key_stats.seq_len=64",
                f"--trainer.default_root_dir={tmp_path / 'runs'}", *args]
        with pytest.raises(SystemExit) as info:
            main(full)
        err = capsys.readouterr().err
        assert info.value.code not in (0, None), args
        assert message in err, (args, err[-2000:])
        assert "Traceback" not in err


def test_cache_of_another_model_or_corrupt_is_refused(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The C0 cache: a corrupt file, and a file of another model put in its place."""
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    cfg = KeyStatistics(num_tokens=1024, seq_len=64)
    from encore_pl.stats import compute_key_statistics, model_fingerprint, cache_path

    other_dir = make_tiny_model("llama", tmp_path / "other", seed=1)
    model, tok = load_model_and_tokenizer(str(other_dir))
    compute_key_statistics(LocatedModel(model), tok, [1], cfg)
    theirs = cache_path(model_fingerprint(model), 1, cfg, cfg.corpus_id())
    mine_model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    mine = cache_path(model_fingerprint(mine_model), 1, cfg, cfg.corpus_id())
    mine.write_bytes(theirs.read_bytes())
    with pytest.raises(ValueError, match="belongs to another model"):
        compute_key_statistics(LocatedModel(mine_model), tok, [1], cfg)
    mine.write_bytes(theirs.read_bytes()[:100])
    with pytest.raises(ValueError, match="is corrupt"):
        compute_key_statistics(LocatedModel(mine_model), tok, [1], cfg)


def test_error_in_a_subprocess_prints_no_traceback(tiny_llama_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "fit", f"--model.model_name_or_path={tiny_llama_dir}",
                           "--model.layers=[1,2]", f"--trainer.default_root_dir={tmp_path}", "--data.path", str(tmp_path / "nope.json")],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "ENCORE_PL_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert "encore-pl: error: data file" in proc.stderr and "Traceback" not in proc.stderr

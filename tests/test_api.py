"""The Python API (encore_pl.Editor and friends) on a tiny random Llama: the same edits as a
Lightning run, save -> load -> continue equal to one editor, patches, and a core without Lightning."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import encore_pl
from encore_pl.data import QUICKSTART_PATH
from encore_pl.datamodule import EditDataModule
from encore_pl.module import KnowledgeEditor

REPO = Path(__file__).parents[1]

LAYERS = [1, 2]
SECTIONS = dict(
    layers=LAYERS,
    solver=encore_pl.SolverConfig(lambda_p=1.0, lambda_n=1.0),
    target=encore_pl.TargetOptimization(v_num_grad_steps=6),
    key_stats=encore_pl.KeyStatistics(num_tokens=1024, seq_len=64),
    evaluation=encore_pl.EvaluationConfig(generation_scores=False),
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))


def fresh(tiny_llama_dir):
    return encore_pl.load_model(str(tiny_llama_dir))


def increments(editor) -> dict[str, torch.Tensor]:
    return editor.state.layers.increments()


def test_api_and_lightning_run_give_the_same_patch(tiny_llama_dir, tmp_path, cache):
    requests = encore_pl.load_requests(QUICKSTART_PATH, num_edits=8)
    editor = encore_pl.Editor(*fresh(tiny_llama_dir), encore_pl.EditorConfig(**SECTIONS))
    records = editor.edit(requests, batch_size=4, progress=False)
    assert [r["num_edits"] for r in records] == [4, 8]

    module = KnowledgeEditor(str(tiny_llama_dir), **SECTIONS)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
                        accelerator="cpu", default_root_dir=tmp_path / "run")
    trainer.fit(module, datamodule=EditDataModule(num_edits=8, batch_size=4))
    run = module.editor
    assert run.state.context_prefixes == editor.state.context_prefixes
    for name, d in increments(editor).items():
        assert d.abs().max() > 1e-4  # a real edit (increments of ~1e-4 on this tiny model)
        torch.testing.assert_close(increments(run)[name], d, atol=1e-6, rtol=0)
    assert run.state.z_steps == editor.state.z_steps


def test_save_load_continue_equals_one_editor(tiny_llama_dir, tmp_path, cache):
    requests = encore_pl.load_requests(QUICKSTART_PATH, num_edits=8)
    config = encore_pl.EditorConfig(**SECTIONS)
    one = encore_pl.Editor(*fresh(tiny_llama_dir), config)
    one.edit(requests, batch_size=4, progress=False)

    first = encore_pl.Editor(*fresh(tiny_llama_dir), config)
    first.edit(requests[:4], batch_size=4, progress=False)
    first.save(tmp_path / "my-edits")
    model2, tok2 = fresh(tiny_llama_dir)
    later = encore_pl.Editor.load(tmp_path / "my-edits", model2, tok2)
    assert [r.case_id for r in later.state.edited] == [r.case_id for r in requests[:4]]
    later.edit(requests[4:], batch_size=4, progress=False)

    for name, d in increments(one).items():
        torch.testing.assert_close(increments(later)[name], d, atol=1e-6, rtol=0)
    lm = encore_pl.editor.LocatedModel(model2)
    for l in LAYERS:  # the edited model itself, not only the recorded increments
        torch.testing.assert_close(lm.weight_out_in(l), one.lm.weight_out_in(l), atol=1e-6, rtol=0)
    assert later.state.history[-1]["num_edits"] == 8 and len(later.state.history) == 2
    scores = later.evaluate(requests)
    assert set(scores) >= {"efficacy_score", "paraphrase_score", "neighborhood_score", "overall_score"}


def test_load_refuses_another_base_model(tiny_llama_dir, tmp_path, cache):
    editor = encore_pl.Editor(*fresh(tiny_llama_dir), encore_pl.EditorConfig(**SECTIONS))
    editor.edit(encore_pl.load_requests(QUICKSTART_PATH, num_edits=4), batch_size=4, progress=False)
    editor.save(tmp_path / "e")
    other, tok = fresh(tiny_llama_dir)
    with torch.no_grad():
        encore_pl.editor.LocatedModel(other).weight_out_in(1).add_(0.01)
    with pytest.raises(ValueError, match="not the base it was made on"):
        encore_pl.Editor.load(tmp_path / "e", other, tok)


def test_apply_and_revert_patch(tiny_llama_dir, tmp_path, cache):
    editor = encore_pl.Editor(*fresh(tiny_llama_dir), encore_pl.EditorConfig(**SECTIONS))
    editor.edit(encore_pl.load_requests(QUICKSTART_PATH, num_edits=4), batch_size=4, progress=False)
    editor.save(tmp_path / "e")
    model3, _ = fresh(tiny_llama_dir)
    base = {l: encore_pl.editor.LocatedModel(model3).weight_out_in(l).clone() for l in LAYERS}
    encore_pl.apply_patch(model3, tmp_path / "e" / "edits.safetensors")
    lm3 = encore_pl.editor.LocatedModel(model3)
    for l in LAYERS:
        torch.testing.assert_close(lm3.weight_out_in(l), editor.lm.weight_out_in(l), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="refusing to apply"):
        encore_pl.apply_patch(model3, tmp_path / "e" / "edits.safetensors")  # twice: no longer the base
    encore_pl.revert_patch(model3, tmp_path / "e" / "edits.safetensors")
    for l in LAYERS:
        torch.testing.assert_close(lm3.weight_out_in(l), base[l], atol=1e-6, rtol=0)


def test_editor_config_from_a_run_config():
    config = encore_pl.EditorConfig.from_yaml(REPO / "configs" / "smollm2-135m" / "encore.yaml")
    assert config.layers == [4, 5, 6, 7, 8] and config.solver.lambda_p == 500.0 and config.target.extra_steps == 3
    assert config.key_stats.seq_len == 512


def test_editor_config_names_an_unknown_setting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  solver:\n    lamda_p: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: solver: unknown setting\(s\) lamda_p"):
        encore_pl.EditorConfig.from_yaml(bad)


def test_the_core_imports_without_lightning():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import encore_pl, encore_pl.editor, encore_pl.evaluation, encore_pl.patches\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'lightning']\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_run_continues_a_finished_run_with_new_requests(tiny_llama_dir, tmp_path, cache):
    """`--model.continue_from RUN_DIR`: a second run edits new requests on top of the first run's
    lifelong state; its patch is cumulative and equals one editor that edited both lists."""
    import json

    from encore_pl.checkpoints import EditCheckpoint

    records = json.loads(QUICKSTART_PATH.read_text())
    (tmp_path / "first.json").write_text(json.dumps(records[:4]))
    (tmp_path / "new.json").write_text(json.dumps(records[4:8]))

    def fit(path, **kw):
        module = KnowledgeEditor(str(tiny_llama_dir), **SECTIONS, **kw)
        trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            inference_mode=False, use_distributed_sampler=False, accelerator="cpu",
                            default_root_dir=tmp_path / path.stem, callbacks=[EditCheckpoint()])
        trainer.fit(module, datamodule=EditDataModule(path=str(path), batch_size=4))
        return module, trainer

    first, trainer = fit(tmp_path / "first.json")
    from encore_pl.reports import run_so_far  # a run read from its last checkpoint, as plots and tables do

    so_far = run_so_far(tmp_path / "first" / "checkpoints" / "last.ckpt")
    finished = json.loads((tmp_path / "first" / "results.json").read_text())
    assert so_far["partial"] and so_far["method"] == "encore" and so_far["num_edits"] == 4
    assert so_far["pre"] == pytest.approx(finished["pre"])  # rebuilt from the pre-edit metric states
    # the checkpoint is saved right after the update; the MLP/residual ratio is measured after it
    assert [{k: v for k, v in b.items() if k != "mlp_residual_ratio"} for b in finished["history"]] == so_far["history"]
    second, _ = fit(tmp_path / "new.json", continue_from=str(tmp_path / "first"))
    assert [r.case_id for r in second.edited] == [str(r["case_id"]) for r in records[:8]]
    assert second.editor.state.context_prefixes == first.editor.state.context_prefixes

    one = encore_pl.Editor(*fresh(tiny_llama_dir), encore_pl.EditorConfig(**SECTIONS))
    one.edit(encore_pl.load_requests(QUICKSTART_PATH, num_edits=8), batch_size=4, progress=False)
    for name, d in increments(one).items():
        torch.testing.assert_close(increments(second.editor)[name], d, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="window"):  # another window: refused
        KnowledgeEditor(str(tiny_llama_dir), **{**SECTIONS, "layers": [2, 3]}).editor.take_over(
            encore_pl.editor.read_saved_state(tmp_path / "first"))

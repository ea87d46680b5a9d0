"""The residual is spread over the window, and the last layer closes the remaining gap."""

import torch

from encore_pl.update import spread_update
from encore_pl.edited import EditedLayers
from encore_pl.data import QUICKSTART_PATH, read_requests
from encore_pl.keys import compute_keys
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer
from encore_pl.solvers import memit_update


def test_residual_spread_across_layers(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    lm = LocatedModel(model)
    requests, _ = read_requests(QUICKSTART_PATH, num_edits=3)
    prefixes = ["The first thing. ", "I know. "]
    layers, z_layer = [1, 2], 2
    _, h = compute_keys(lm, tok, requests, prefixes, layers, z_layer)
    torch.manual_seed(0)
    z = h + 0.5 * torch.randn_like(h) * h.norm(dim=1, keepdim=True) / h.shape[1] ** 0.5
    c0 = torch.eye(lm.weight_out_in(1).shape[1], dtype=torch.float64)
    seen = []

    def solve(layer, resid, k):
        seen.append(resid.clone())
        return memit_update(resid, k, c0, 1e-6)  # almost no preservation: each layer meets its share

    spread_update(EditedLayers(lm, layers), tok, requests, prefixes, z_layer, z, solve)
    # First layer: half of the full residual. Second (last) layer: all that remains.
    torch.testing.assert_close(seen[0], (z - h).T.double() / 2)
    # The first layer's increment moved the z-layer output toward z: less than the full gap remains.
    assert seen[1].norm() < 2 * seen[0].norm()
    _, after = compute_keys(lm, tok, requests, prefixes, layers, z_layer)
    assert (after - z).norm() < 0.02 * (h - z).norm()


def test_window_keys_equal_a_fresh_pass_on_the_partly_updated_model(tiny_model_dir):
    """WindowKeys starts each pass at the last updated block; a full pass from the embeddings agrees."""
    from encore_pl.keys import WindowKeys

    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    lm = LocatedModel(model)
    requests, _ = read_requests(QUICKSTART_PATH, num_edits=5)
    prefixes = ["The first thing. ", "I know. "]
    layers, z_layer = [0, 1, 2], 3
    window = WindowKeys(lm, tok, requests, prefixes, z_layer, batch_size=4)  # several chunks
    torch.manual_seed(0)
    for layer in layers:
        keys, out = window.at(layer)
        fresh_keys, fresh_out = compute_keys(lm, tok, requests, prefixes, [layer], z_layer)
        torch.testing.assert_close(keys, fresh_keys[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, fresh_out, atol=1e-5, rtol=1e-5)
        w = lm.weight_out_in(layer)
        with torch.no_grad():
            w.add_(0.2 * torch.randn_like(w) * w.std())  # changes every later key
    keys_after, out_after = window.at(layers[-1])
    torch.testing.assert_close(keys_after, keys)  # a layer's own update does not change its keys
    assert not torch.allclose(out_after, out, atol=1e-4)  # but the z-layer output sees it


def test_chunked_target_vectors_give_the_same_patch(tiny_llama_dir, tmp_path, monkeypatch):
    """target.chunk_size 5 on a batch of 25 requests: the same edit as all 25 together (chunks with
    requests that stop at different steps: tests/test_target_vectors.py)."""
    import lightning as L

    from encore_pl.datamodule import EditDataModule
    from encore_pl.module import KnowledgeEditor
    from encore_pl.solvers import SolverConfig
    from encore_pl.stats import KeyStatistics
    from encore_pl.target_vectors import TargetOptimization

    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    patches = []
    for chunk_size in (None, 5):
        module = KnowledgeEditor(str(tiny_llama_dir), layers=[1, 2], key_stats=KeyStatistics(num_tokens=1024, seq_len=64),
                                 solver=SolverConfig(lambda_p=1.0, lambda_n=1.0),
                                 target=TargetOptimization(v_num_grad_steps=8, chunk_size=chunk_size))
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
                            accelerator="cpu", default_root_dir=tmp_path / str(chunk_size))
        trainer.fit(module, datamodule=EditDataModule(num_edits=25, batch_size=25))
        patches.append(module.edited_layers.increments())
    for name, whole in patches[0].items():
        assert whole.abs().max() > 1e-3
        torch.testing.assert_close(patches[1][name], whole, atol=1e-6, rtol=0)

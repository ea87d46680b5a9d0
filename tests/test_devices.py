"""Where tensors live: every tensor the package creates has an explicit device, state follows the
model to its device, and reduced-precision weights hold exactly round(W_base + cumulative).

No GPU is reachable here. What these CPU tests can catch: a tensor created without a device that
meets the model's tensors or is read back (with the meta device as default, it is a meta tensor:
mixing it with real tensors or reading a value fails); state created at construction that a
module move leaves behind (plain dicts and lists of tensors instead of buffers and submodules); a
metric created at run time (its states would be meta). What they cannot catch: a tensor put on
the CPU on purpose (`.cpu()`, `device="cpu"`) where a GPU one is needed, e.g. a CPU tensor passed
to an NCCL collective (`Ranks` moves those to the process's GPU), and anything that only shows
with two real devices (a weight on one GPU, its increment on another).
"""

import lightning as L
import pytest
import torch
from torch import nn

from encore_pl.datamodule import EditDataModule
from encore_pl.module import EvaluationConfig, KnowledgeEditor
from encore_pl.solvers import SolverConfig
from encore_pl.stats import KeyStatistics
from encore_pl.target_vectors import TargetOptimization

KEY_STATS = KeyStatistics(num_tokens=1280, seq_len=64)  # C0 needs >= 10 x d_ff tokens (tiny GPT-2: d_ff 128)


def trainer(tmp_path, callbacks=()):
    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
                     accelerator="cpu", callbacks=list(callbacks), default_root_dir=tmp_path)


class AfterEachBatch(L.Callback):
    """Edited weights, cumulative increments and base weights after every batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        e = pl_module.edited_layers
        self.seen.append({l: (pl_module.lm.weight_out_in(l).detach().clone(), e.increment(l).clone(), e.base(l).clone())
                          for l in pl_module.layers})


def test_fit_creates_no_tensor_without_a_device(tiny_llama_dir, tmp_path, monkeypatch):
    """The whole fit (C0, prefixes, pre-scores, z optimisation, keys, solves, retention, entropy,
    post-scores, patch) with the meta device as the default for tensors created without one."""
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    module = KnowledgeEditor(str(tiny_llama_dir), layers=[1, 2], key_stats=KEY_STATS,
                             target=TargetOptimization(v_num_grad_steps=4, chunk_size=2), solver=SolverConfig(state_device="cpu"),
                             evaluation=EvaluationConfig(every_n_batches=1, generation_prompts=2, generation_length=12))
    data = EditDataModule(num_edits=6, batch_size=3)
    t = trainer(tmp_path)
    # Lightning's own result collection makes its tensors without a device (and moves them where
    # the logged values are): its logging runs with the real default, everything else with meta.
    log = L.LightningModule.log

    def log_on_cpu(self, *args, **kwargs):
        with torch.device("cpu"):
            return log(self, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", log_on_cpu)
    default = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        t.fit(module, datamodule=data)
    finally:
        torch.set_default_device(default)
    assert len(module.edited) == 6 and len(module.retention) == 2
    assert (tmp_path / "edits.safetensors").exists()
    assert all(module.edited_layers.increment(l).abs().max() > 0 for l in module.layers)


def tensors_held(obj, path="", seen=None):
    """(path, tensor) of every tensor reachable from `obj` through attributes, dicts, lists and tuples,
    not through submodules' own parameters and buffers (those move with the module)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_held(v, f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_held(v, f"{path}[{i}]", seen)
    elif isinstance(obj, nn.Module):
        for name, v in vars(obj).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                yield from tensors_held(v, f"{path}.{name}", seen)
        for name, child in obj._modules.items():
            yield from tensors_held(child, f"{path}.{name}", seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("encore_pl"):
        yield from tensors_held(vars(obj), path, seen)


def test_state_made_at_construction_follows_the_module(tiny_model_dir):
    """What Lightning's model_to_device does to the module: every tensor it holds must go along."""
    module = KnowledgeEditor(str(tiny_model_dir), layers=[1, 2], key_stats=KEY_STATS)
    module.to("meta")
    left_behind = [p for p, t in tensors_held(module) if t.device.type != "meta"]
    assert not left_behind, f"tensors a module move leaves behind: {left_behind}"
    assert module.edited_layers.base(1).device.type == "meta"  # the buffers did move


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_weights_are_exactly_base_plus_cumulative(tiny_model_dir, tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    module = KnowledgeEditor(str(tiny_model_dir), dtype=dtype, layers=[1, 2], key_stats=KEY_STATS,
                             solver=SolverConfig(lambda_p=0.1, lambda_n=0.1), target=TargetOptimization(v_num_grad_steps=5))
    applied = []
    add = module.edited_layers.add
    monkeypatch.setattr(module.edited_layers, "add", lambda l, d: (applied.append((l, d.clone())), add(l, d)))
    after = AfterEachBatch()
    trainer(tmp_path, [after]).fit(module, datamodule=EditDataModule(num_edits=8, batch_size=2))
    assert len(after.seen) == 4
    total = {l: torch.zeros_like(after.seen[0][l][1]) for l in module.layers}
    for state in after.seen:
        for l, (w, inc, base) in state.items():
            assert w.dtype == getattr(torch, dtype) and inc.dtype == torch.float32
            assert torch.equal(w, (base.float() + inc).to(w.dtype))  # rounded once, from the exact sum
    for l, d in applied:
        total[l] += d.float()
    for l in module.layers:
        inc = module.edited_layers.increment(l)
        torch.testing.assert_close(inc, total[l], rtol=1e-5, atol=1e-7)  # every batch's increment kept
        assert inc.abs().max() > 0
        # Adding each increment to the half-precision weight instead would have lost part of it:
        naive = after.seen[0][l][2].clone()
        for layer, d in applied:
            if layer == l:
                naive += d.to(naive.dtype)
        exact = after.seen[0][l][2].float() + total[l]
        assert (naive.float() - exact).norm() > (module.lm.weight_out_in(l).float() - exact).norm()

"""The memory estimator (encore_pl/memory.py) and scripts/plan.py: no model is loaded, nothing runs forward."""

import subprocess
import sys
from pathlib import Path

import pytest

from encore_pl.memory import (
    BUILTIN_MODELS,
    GiB,
    ModelDims,
    RunSettings,
    estimate,
    parameter_count,
    plan_fit,
    read_settings,
)
from encore_pl.module import EvaluationConfig
from encore_pl.solvers import SolverConfig
from encore_pl.stats import KeyStatistics
from encore_pl.target_vectors import TargetOptimization

REPO = Path(__file__).parents[1]
LLAMA3 = str(REPO / "configs" / "llama3-8b" / "encore.yaml")
SMOLLM2 = str(REPO / "configs" / "smollm2-135m" / "encore.yaml")

# A made-up Llama-style model: d 8, d_ff 16, 4 layers, 2 heads of 4 (1 key/value head), vocabulary 32,
# tied embeddings. By hand: per block q 8x8 + k, v 2 x 8x4 + o 8x8 + gate, up, down 3 x 8x16 + 2 norms x 8
# = 64 + 64 + 64 + 384 + 16 = 592; 4 blocks 2,368; embedding 32 x 8 = 256; final norm 8: 2,632.
TINY_PARAMS = 2632


def tiny_dims() -> ModelDims:
    params = parameter_count("llama", 8, 16, 4, 2, 1, 4, 32, 64, True)
    return ModelDims("tiny", 8, 16, 4, 2, 1, 4, 32, 64, True, True, params, "float32", "made up")


def tiny(method="encore", processes=1, state_device=None, chunk_size=None, batch_size=4) -> RunSettings:
    return RunSettings(
        model="tiny", dims=tiny_dims(), dtype="float32", layers=[1, 2, 3], z_layer=3,
        solver=SolverConfig(method=method, state_device=state_device),
        target=TargetOptimization(chunk_size=chunk_size),
        key_stats=KeyStatistics(), evaluation=EvaluationConfig(),
        batch_size=batch_size, num_edits=None, processes=processes, accelerator="gpu",
    )


def resident(pe, start: str) -> dict[str, float]:
    """{item: bytes} resident during the first phase whose name starts with `start`."""
    return dict(next(p for p in pe.phases if p.name.startswith(start)).resident)


def find(items: dict[str, float], start: str) -> float:
    return next(b for n, b in items.items() if n.startswith(start))


def test_persistent_parts_by_hand():
    assert tiny_dims().params == TINY_PARAMS
    p0 = estimate(tiny()).device[0]
    held = resident(p0, "z optimisation")
    assert find(held, "weights") == TINY_PARAMS * 4  # float32
    assert find(held, "edited matrices") == 3 * 8 * 16 * (4 + 4)  # base copy (float32) + float32 increment, 3 layers
    assert find(held, "key sums") == 3 * 16 * 16 * 8  # float64 d_ff^2 per edited layer
    assert find(held, "cached inverses") == 3 * 16 * 16 * 8  # Woodbury: batch 4 <= d_ff / 4
    assert not any(n.startswith("AlphaEdit") for n in held)
    alpha = resident(estimate(tiny("alphaedit")).device[0], "z optimisation")
    assert find(alpha, "AlphaEdit projectors") == 3 * 16 * 16 * 8
    # the key sums are placed after C0's pass, the inverses built at the first solve
    c0 = resident(p0, "C0 pass")
    assert not any(n.startswith(("key sums", "cached inverses")) for n in c0)
    # a batch above d_ff / 4 takes the plain solve: no inverse is kept
    plain = resident(estimate(tiny(batch_size=5)).device[0], "z optimisation")
    assert not any(n.startswith("cached inverses") for n in plain)


def test_builtin_models_match_published_parameter_counts():
    assert BUILTIN_MODELS["meta-llama/meta-llama-3-8b"].params == 8_030_261_248
    assert BUILTIN_MODELS["meta-llama/llama-2-7b-hf"].params == 6_738_415_616
    assert BUILTIN_MODELS["openai-community/gpt2-xl"].params == 1_557_611_200
    assert BUILTIN_MODELS["smollm2-135m"].params == 134_515_008  # counted on the loaded model


def test_process_zero_holds_the_state_and_others_a_smaller_share():
    e = estimate(tiny(processes=3, batch_size=10, chunk_size=None))
    p0, other = e.device
    assert (p0.who, other.who) == ("process 0", "each other process")
    assert any(n.startswith("key sums") for n in resident(p0, "z optimisation"))
    assert not any(n.startswith(("key sums", "cached", "AlphaEdit")) for n in resident(other, "z optimisation"))
    z0, z1 = (next(p for p in pe.phases if p.name.endswith("steps")) for pe in (p0, other))
    assert z0.transient_bytes == z1.transient_bytes  # the busiest share, ceil(10 / 3) = 4 requests, on both
    # process 0's key sums (no inverse: 10 keys a batch > d_ff / 4 take the plain solve)
    assert z0.total() - z1.total() == 3 * 16 * 16 * 8
    assert e.settings.per_process == 4
    one = estimate(tiny(processes=1, batch_size=10))
    assert next(p for p in one.device[0].phases if p.name.endswith("steps")).transient_bytes > z0.transient_bytes


def test_state_device_cpu_moves_the_float64_matrices_to_the_host():
    on_device, on_host = estimate(tiny()), estimate(tiny(state_device="cpu"))
    moved = 2 * 3 * 16 * 16 * 8  # key sums + inverses
    assert not any(n.startswith(("key sums", "cached")) for n in resident(on_host.device[0], "z optimisation"))
    dev_before = sum(resident(on_device.device[0], "z optimisation").values())
    dev_after = sum(resident(on_host.device[0], "z optimisation").values())
    assert dev_before - dev_after == moved
    host = resident(on_host.host[0], "editing")
    assert find(host, "key sums") + find(host, "cached inverses") == moved


def test_chunk_size_lowers_the_z_phase():
    def z_transient(s):
        return next(p for p in estimate(s).device[0].phases if p.name.endswith("steps")).transient_bytes

    big = tiny(batch_size=100, chunk_size=None)
    small = tiny(batch_size=100, chunk_size=10)
    assert small.chunk == 10 and big.chunk == 100
    assert z_transient(small) == pytest.approx(z_transient(big) / 10, rel=0.01)  # linear in the chunk
    assert tiny(batch_size=4, chunk_size=10).chunk == 4  # never more than the share


def test_reads_config_with_the_runs_defaults_and_overrides():
    s = read_settings([LLAMA3], {"model.target.chunk_size": 10, "data.batch_size": 50})
    assert s.dims.d_ff == 14336 and s.dims.kv_heads == 8 and s.dtype == "bfloat16"
    assert s.layers == [4, 5, 6, 7, 8] and s.z_layer == 8
    assert s.solver.solve == "woodbury" and s.solver.state_device is None  # SolverConfig defaults
    assert s.evaluation.batch_size == 64  # EvaluationConfig default
    assert s.chunk == 10 and s.batch_size == 50 and s.processes == 1
    with pytest.raises(ValueError, match="unknown key"):
        read_settings([LLAMA3], {"model.target.chunk": 10})


def test_llama3_matches_the_review_and_fits_24_gib_with_cheap_settings():
    s = read_settings([LLAMA3], accelerator="gpu")
    e = estimate(s)
    steps = next(p for p in e.device[0].phases if p.name.endswith("steps"))
    assert 16e9 < steps.transient_bytes < 30e9  # the GPU review: about 23 GB of z activations at batch 100
    assert 45e9 < e.device[0].peak() < 65e9  # the review: about 56 GB on one GPU
    plan = plan_fit(s, 24 * GiB)
    assert plan.fits
    keys = [k for k, _, _ in plan.changes]
    assert keys[:2] == ["model.solver.state_device", "model.target.chunk_size"]
    assert max(p.peak(plan.margin) for p in plan.estimate.device) <= 23 * GiB
    assert plan.settings.solver.state_device == "cpu" and plan.settings.chunk < 100


def test_llama3_cannot_fit_8_gib():
    plan = plan_fit(read_settings([LLAMA3], accelerator="gpu"), 8 * GiB)
    assert not plan.fits
    assert "weights alone" in plan.reason


def test_smollm2_cpu_estimate_within_25_percent_of_the_measured_peak():
    from encore_pl.memory import MEASURED_SMOLLM2_PEAK_GIB

    # as the benchmark ran (C0 was cached), with the built-in dimensions (no model directory needed)
    s = read_settings([SMOLLM2], {"data.num_edits": 100, "data.batch_size": 25}, accelerator="cpu", c0_cached=True,
                      dims=BUILTIN_MODELS["smollm2-135m"])
    peak = estimate(s).host[0].peak() / GiB
    assert abs(peak - MEASURED_SMOLLM2_PEAK_GIB) <= 0.25 * MEASURED_SMOLLM2_PEAK_GIB


def test_plan_script_prints_the_table_and_settings_that_fit():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "plan.py"), "--config", LLAMA3, "--gpu-memory", "24"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "GPU memory per process" in out.stdout and "Host RAM per process" in out.stdout
    assert "z optimisation, 100 requests: steps" in out.stdout
    assert "FITS with: --model.solver.state_device cpu --model.target.chunk_size" in out.stdout
    small = subprocess.run([sys.executable, str(REPO / "scripts" / "plan.py"), "--config", LLAMA3, "--gpu-memory", "8"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert small.returncode == 0 and "DOES NOT FIT" in small.stdout and "weights alone" in small.stdout


def test_bfloat16_steps_add_their_copy_by_hand():
    """target.compute_dtype bfloat16 on a float32 model: blocks after z (z = 1: blocks 2, 3 of 4),
    the tied embedding: (2 x 592 + 256) x 2 bytes, resident from the start."""
    s = tiny()
    s = RunSettings(**{**vars(s), "z_layer": 1, "target": TargetOptimization(compute_dtype="bfloat16")})
    items = resident(estimate(s).device[0], "z optimisation")
    # (the estimate spreads the final norm's 8 parameters over the blocks)
    assert find(items, "z steps' copy in bfloat16") == pytest.approx((2 * 592 + 256) * 2, rel=0.01)
    same = RunSettings(**{**vars(s), "target": TargetOptimization(compute_dtype="float32")})
    assert not any(n.startswith("z steps' copy") for n in resident(estimate(same).device[0], "z optimisation"))

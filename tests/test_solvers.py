"""Each closed form equals a direct numerical minimisation of its stated objective, and the
incremental Woodbury solve equals the plain closed form at every batch of a sequence."""

from types import SimpleNamespace
from typing import get_args

import pytest
import torch

import encore_pl.editor as editor_module
import encore_pl.update as update_module
from encore_pl.editor import Editor
from encore_pl.solvers import (
    SOLVERS,
    Method,
    SolverConfig,
    WoodburySolver,
    alphaedit_update,
    encore_update,
    memit_update,
    nullspace_projector,
)

D_OUT, D_FF, N, N0, NPREV = 4, 6, 3, 20, 5


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(D_OUT, N, generator=g, dtype=torch.float64)
    k = torch.randn(D_FF, N, generator=g, dtype=torch.float64)
    k0 = torch.randn(D_FF, N0, generator=g, dtype=torch.float64)
    kp = torch.randn(D_FF, NPREV, generator=g, dtype=torch.float64)
    return r, k, k0, kp


def minimise(objective, shape):
    """Minimise a convex quadratic numerically (L-BFGS in float64, no closed form involved)."""
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return x.detach()


@pytest.mark.parametrize("lambda_n", [0.0, 2.0])
@pytest.mark.parametrize("with_prev", [False, True])
def test_encore_closed_form_minimises_its_objective(lambda_n, with_prev):
    r, k, k0, kp = problem()
    lambda_p = 0.7
    c0 = k0 @ k0.T
    prev = kp @ kp.T if with_prev else None

    def objective(d):  # with W K - V = -R: ||(W + D) K - V||^2 = ||D K - R||^2
        loss = lambda_p * (d @ k0).square().sum() + (d @ k - r).square().sum() + lambda_n * d.square().sum()
        return loss + ((d @ kp).square().sum() if with_prev else 0)

    closed = encore_update(r, k, c0, lambda_p, lambda_n, prev)
    torch.testing.assert_close(closed, minimise(objective, closed.shape), atol=1e-6, rtol=1e-6)


def test_encore_without_norm_penalty_and_previous_keys_is_memit():
    r, k, k0, _ = problem(1)
    c0 = k0 @ k0.T
    torch.testing.assert_close(encore_update(r, k, c0, 3.0, 0.0, None), memit_update(r, k, c0, 3.0, None))
    assert not torch.allclose(encore_update(r, k, c0, 3.0, 5.0, None), memit_update(r, k, c0, 3.0, None))


def test_alphaedit_closed_form_minimises_its_objective_and_spares_preserved_keys():
    r, k, _, kp = problem(2)
    # C0 of rank 3: its null space is the 3 remaining directions.
    g = torch.Generator().manual_seed(3)
    k0 = torch.randn(D_FF, 3, generator=g, dtype=torch.float64)
    c0 = k0 @ k0.T
    p = nullspace_projector(c0, 1e-8)
    assert torch.linalg.matrix_rank(p) == D_FF - 3
    l2 = 0.5

    def objective(d):
        return (d @ p @ k - r).square().sum() + (d @ p @ kp).square().sum() + l2 * d.square().sum()

    closed = alphaedit_update(r, k, p, l2, kp @ kp.T)
    torch.testing.assert_close(closed, minimise(objective, closed.shape), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(closed @ k0, torch.zeros(D_OUT, 3, dtype=torch.float64), atol=1e-9, rtol=0)


# The incremental solve ------------------------------------------------------------------------

SEQ_D_FF, SEQ_N, SEQ_RANK_C0 = 16, 3, 10


def sequence_problem(seed: int, method: str):
    """C0 (of rank 10 for AlphaEdit, full rank otherwise), its null-space projector and a batch generator."""
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(SEQ_D_FF, SEQ_RANK_C0 if method == "alphaedit" else 40, generator=g, dtype=torch.float64)
    c0 = k0 @ k0.T / k0.shape[1]
    p = nullspace_projector(c0, 1e-8) if method == "alphaedit" else None

    def batch(n: int = SEQ_N):
        return torch.randn(D_OUT, n, generator=g, dtype=torch.float64), torch.randn(SEQ_D_FF, n, generator=g, dtype=torch.float64)

    return c0, p, batch


def plain(cfg: SolverConfig, r, k, c0, p, prev):
    """The reference closed form, prev = sum of the earlier batches' K K^T (or None)."""
    prev = prev if cfg.use_prev_keys else None
    if cfg.method == "alphaedit":
        return alphaedit_update(r, k, p, cfg.alphaedit_l2, prev)
    return encore_update(r, k, c0, cfg.lambda_p, cfg.lambda_n if cfg.method == "encore" else 0.0, prev)


CONFIGS = {
    "encore": SolverConfig(method="encore", lambda_p=0.7, lambda_n=2.0, refactor_every=4),
    "memit": SolverConfig(method="memit", lambda_p=0.7, refactor_every=4),
    "memit_no_prev": SolverConfig(method="memit", lambda_p=0.7, use_prev_keys=False, refactor_every=4),
    "alphaedit": SolverConfig(method="alphaedit", alphaedit_l2=0.5, refactor_every=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_woodbury_sequence_equals_plain_solve_at_every_batch(name):
    cfg = CONFIGS[name]
    c0, p, batch = sequence_problem(4, cfg.method)
    fast, stale = WoodburySolver(cfg, c0, p), WoodburySolver(cfg, c0, p)
    builds = []
    build = fast.build
    fast.build = lambda *a: (builds.append(len(builds)), build(*a))
    prev = torch.zeros(SEQ_D_FF, SEQ_D_FF, dtype=torch.float64)
    for i in range(6):
        r, k = batch()
        expected = plain(cfg, r, k, c0, p, prev)
        given_prev = prev if cfg.use_prev_keys else None
        torch.testing.assert_close(fast.solve(r, k, given_prev), expected, rtol=1e-8, atol=1e-12)
        if i >= 1 and cfg.use_prev_keys:  # a cache that does not absorb the batches is wrong
            stale.prev_trace = prev.diagonal().sum().item()  # defeat its rebuild-on-change check
            assert not torch.allclose(stale.solve(r, k, given_prev), expected, rtol=1e-4)
        elif i == 0:
            stale.solve(r, k, given_prev)
        fast.absorb(k)
        prev += k @ k.T
    # Built on first use and again after refactor_every = 4 absorbed batches (never, if M is constant).
    assert len(builds) == (2 if cfg.use_prev_keys else 1)


def test_alphaedit_symmetric_form_equals_the_nonsymmetric_one():
    c0, p, batch = sequence_problem(5, "alphaedit")
    r, k = batch()
    _, kp = batch(7)
    s, l2 = k @ k.T + kp @ kp.T, 0.5
    d = alphaedit_update(r, k, p, l2, kp @ kp.T)  # D (S P + l2 I) = R K^T P
    symmetric = torch.linalg.solve(p @ s @ p + l2 * torch.eye(SEQ_D_FF, dtype=torch.float64), p @ k @ r.T).T
    torch.testing.assert_close(d, symmetric, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(d @ p, d, rtol=1e-10, atol=1e-13)
    # ... while the non-symmetric form without P on the left is a different matrix.
    assert not torch.allclose(s @ p, p @ s @ p)


def test_woodbury_rebuilds_when_prev_changes_outside():
    cfg = CONFIGS["encore"]
    c0, p, batch = sequence_problem(6, "encore")
    fast = WoodburySolver(cfg, c0, p)
    prev = torch.zeros(SEQ_D_FF, SEQ_D_FF, dtype=torch.float64)
    for _ in range(2):
        r, k = batch()
        fast.solve(r, k, prev)
        fast.absorb(k)
        prev += k @ k.T
    _, kp = batch(5)
    other = kp @ kp.T  # e.g. the prev_keys of a loaded checkpoint
    r, k = batch()
    torch.testing.assert_close(fast.solve(r, k, other), plain(cfg, r, k, c0, p, other), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["encore", "alphaedit"])
def test_large_batch_and_cholesky_mode_take_the_plain_path(name):
    cfg = CONFIGS[name]
    c0, p, batch = sequence_problem(7, cfg.method)
    fast = WoodburySolver(cfg, c0, p)
    prev = torch.zeros(SEQ_D_FF, SEQ_D_FF, dtype=torch.float64)
    for n in [SEQ_N, SEQ_D_FF + 2, SEQ_N, SEQ_N]:  # n >= d_ff in the middle
        r, k = batch(n)
        torch.testing.assert_close(fast.solve(r, k, prev), plain(cfg, r, k, c0, p, prev), rtol=1e-8, atol=1e-12)
        assert (fast.last is None) == (n > SEQ_D_FF // 4)
        fast.absorb(k)
        prev += k @ k.T
    for mode in [dict(solve="cholesky"), dict(refactor_every=0)]:
        cholesky = WoodburySolver(SolverConfig(**{**vars(cfg), **mode}), c0, p)
        r, k = batch()
        torch.testing.assert_close(cholesky.solve(r, k, prev), plain(cfg, r, k, c0, p, prev), rtol=1e-8, atol=1e-12)
        cholesky.absorb(k)
        assert cholesky.minv is None


@pytest.mark.parametrize("name", ["encore", "alphaedit"])
def test_editor_update_solves_through_the_cache_and_updates_prev_keys(monkeypatch, name):
    cfg = CONFIGS[name]
    c0, p, batch = sequence_problem(8, cfg.method)
    layers = [3, 4]
    bufs = {l: torch.zeros(SEQ_D_FF, SEQ_D_FF, dtype=torch.float64) for l in layers}
    edited = SimpleNamespace(key_sums=bufs, add_keys=lambda l, k: bufs[l].addmm_(k, k.T))
    state = SimpleNamespace(layers=edited, context_prefixes=[], edited=[], skipped=[], history=[], z_steps=[], target_probs=[])
    editor = SimpleNamespace(  # what Editor.update reads
        config=SimpleNamespace(solver=cfg, on_nonfinite="error"), state=state, solvers={},
        c0={l: c0 for l in layers}, projectors={l: p for l in layers} if p is not None else {},
        lm=SimpleNamespace(weight_out_in=lambda l: torch.ones(2)), original_norms={l: 1.0 for l in layers},
        tokenizer=None, z_layer=layers[-1], ranks=None,
    )
    seen = []

    def fake_spread(edited, tok, requests, prefixes, z_layer, z, solve, seconds=None, ranks=None):  # random keys per layer
        applied = {}
        for layer in layers:
            r, k = batch()
            prev = bufs[layer].clone()
            applied[layer] = update_module.Increment(solve(layer, r, k), k, None, None, layer)
            seen.append((layer, applied[layer].d, plain(cfg, r, k, c0, p, prev), prev, k))
        return applied

    monkeypatch.setattr(editor_module, "spread_update", fake_spread)
    targets = {"z": torch.zeros(1, 4), "steps": torch.ones(1), "target_prob": torch.ones(1)}
    expected_prev = {l: torch.zeros_like(bufs[l]) for l in layers}
    for i in range(3):
        Editor.update(editor, ["request"], targets, i)
    assert len(seen) == 6 and set(editor.solvers) == set(layers)  # one cached solver per layer
    assert [h["num_edits"] for h in state.history] == [1, 2, 3] and state.edited == ["request"] * 3
    for layer, d, expected, prev, k in seen:
        torch.testing.assert_close(d, expected, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(prev, expected_prev[layer])  # prev_keys as before: + K K^T per batch
        expected_prev[layer] = expected_prev[layer] + k @ k.T
    assert all(editor.solvers[l].minv is not None for l in layers)
    for layer in layers:
        torch.testing.assert_close(bufs[layer], expected_prev[layer])


def test_woodbury_falls_back_to_the_plain_solve_on_an_indefinite_c0():
    """MEMIT (lambda_n = 0) on a C0 with a slightly negative eigenvalue, as a float32 C0 of a
    nearly rank-deficient corpus can have: M = lambda_p C0 is not positive definite, so the cached
    Cholesky fails; the batch is solved by the plain closed form (general solve) instead of crashing."""
    g = torch.Generator().manual_seed(11)
    d_ff = 32
    q, _ = torch.linalg.qr(torch.randn(d_ff, d_ff, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -6, d_ff, dtype=torch.float64)
    eigenvalues[-1] = -1e-7
    c0 = (q * eigenvalues) @ q.T
    cfg = SolverConfig(method="memit", lambda_p=3.0, refactor_every=4)
    solver = WoodburySolver(cfg, c0.float())
    prev = torch.zeros(d_ff, d_ff, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):  # what crashed the run before
        torch.linalg.cholesky(cfg.lambda_p * c0.float().double())
    for _ in range(2):
        r, k = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64), torch.randn(d_ff, 3, generator=g, dtype=torch.float64)
        a = cfg.lambda_p * c0.float().double() + prev + k @ k.T
        d = solver.solve(r, k, prev)
        torch.testing.assert_close(d @ a, r @ k.T, rtol=1e-7, atol=1e-9)  # D (lambda_p C0 + prev + K K^T) = R K^T
        solver.absorb(k)
        prev += k @ k.T
    assert solver.fallbacks >= 1


def test_the_registry_holds_exactly_the_configurable_methods():
    assert set(SOLVERS) == set(get_args(Method))
    with pytest.raises(ValueError, match="known: encore, memit, alphaedit"):
        SolverConfig(method="rome")

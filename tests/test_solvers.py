"""Each closed form equals a direct numerical minimisation of its stated objective."""

import pytest
import torch

from encore_pl.solvers import alphaedit_update, encore_update, memit_update, nullspace_projector

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

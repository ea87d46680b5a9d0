"""Step 3 of METHOD.md: the closed-form weight increments, solved in float64.

Shapes: resid R [d_out, n], keys K [d_ff, n], C0 [d_ff, d_ff], prev = K_prev K_prev^T [d_ff, d_ff].
Each solver returns the increment D [d_out, d_ff] ("out x in") for one layer; `spread` in the
callback distributes the residual over the window.
"""

from dataclasses import dataclass
from typing import Literal, Optional

import torch

Method = Literal["encore", "memit", "alphaedit"]


@dataclass
class SolverConfig:
    """The least-squares update.

    Args:
        method: "encore", "memit" or "alphaedit".
        lambda_p: weight of the preservation term lambda_p * C0 (mom2_update_weight).
        lambda_n: ENCORE's Frobenius-norm penalty on each batch's increment (update_norm_lambda).
            MEMIT is ENCORE with lambda_n = 0.
        use_prev_keys: add the running sum K_prev K_prev^T of earlier batches' keys (the paper's
            sequential MEMIT and ENCORE); False gives plain MEMIT.
        alphaedit_l2: AlphaEdit's ridge term.
        nullspace_threshold: AlphaEdit: eigenvalues of C0 below this span the preserved null space.
    """

    method: Method = "encore"
    lambda_p: float = 15000.0
    lambda_n: float = 20.0
    use_prev_keys: bool = True
    alphaedit_l2: float = 10.0
    nullspace_threshold: float = 2e-2


def _solve_right(resid_kt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """X = resid_kt @ a^-1 for a symmetric positive definite `a`, without forming the inverse."""
    # X a = B  <=>  a X^T = B^T (a symmetric)
    try:
        chol = torch.linalg.cholesky(a)
        return torch.cholesky_solve(resid_kt.T, chol).T
    except RuntimeError:  # not numerically SPD: fall back to a general solve
        return torch.linalg.solve(a, resid_kt.T).T


def memit_update(
    resid: torch.Tensor, keys: torch.Tensor, c0: torch.Tensor, lambda_p: float, prev: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """D = R K^T (lambda_p C0 [+ K_prev K_prev^T] + K K^T)^-1."""
    return encore_update(resid, keys, c0, lambda_p, 0.0, prev)


def encore_update(
    resid: torch.Tensor,
    keys: torch.Tensor,
    c0: torch.Tensor,
    lambda_p: float,
    lambda_n: float,
    prev: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """D = R K^T (lambda_p C0 + lambda_n I [+ K_prev K_prev^T] + K K^T)^-1.

    Minimises lambda_p ||D K0||^2 + ||D K_prev||^2 + ||(W + D) K - V||^2 + lambda_n ||D||_F^2
    with R = V - W K.
    """
    r, k, c0 = resid.double(), keys.double(), c0.double()
    a = lambda_p * c0 + k @ k.T
    if lambda_n:
        a = a + lambda_n * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    if prev is not None:
        a = a + prev.double()
    return _solve_right(r @ k.T, a)


def nullspace_projector(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U_s U_s^T over the eigenvectors of C0 with eigenvalue below `threshold` (AlphaEdit)."""
    eigvals, eigvecs = torch.linalg.eigh(c0.double())
    u = eigvecs[:, eigvals < threshold]
    return u @ u.T


def alphaedit_update(
    resid: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    l2: float,
    prev: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """D = R K^T P (K_prev K_prev^T P + K K^T P + l2 I)^-1.

    This is the minimiser of ||D P K - R||^2 + ||D P K_prev||^2 + l2 ||D||^2, and it satisfies
    D = D P: the increment acts only in the (near) null space of the preserved keys, D K0 ~ 0.
    """
    r, k, p = resid.double(), keys.double(), projector.double()
    kk = k @ k.T if prev is None else k @ k.T + prev.double()
    a = kk @ p + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(a.T, (r @ k.T @ p).T).T

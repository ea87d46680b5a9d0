"""Step 3 of METHOD.md: the closed-form weight increments, solved in float64.

Shapes: resid R [d_out, n], keys K [d_ff, n], C0 [d_ff, d_ff], prev = K_prev K_prev^T [d_ff, d_ff].
Each solver returns the increment D [d_out, d_ff] ("out x in") for one layer; `spread` in the
callback distributes the residual over the window.

All three are D = R K~^T (M + K~ K~^T)^-1 with an SPD M known before the batch. The plain closed
forms below factorise the d_ff x d_ff system every batch; `WoodburySolver` caches M^-1 per layer
and needs only an n x n factorisation per batch (scripts/benchmark_solves.py measures both).
`SOLVERS` holds what differs between the methods: M, K~ and the plain closed form.
"""

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

Method = Literal["encore", "memit", "alphaedit"]


@dataclass
class SolverConfig:
    """The least-squares update.

    Args:
        method: "encore", "memit" or "alphaedit" (the keys of `SOLVERS`).
        lambda_p: weight of the preservation term lambda_p * C0 (mom2_update_weight).
        lambda_n: ENCORE's Frobenius-norm penalty on each batch's increment (update_norm_lambda).
            MEMIT is ENCORE with lambda_n = 0.
        use_prev_keys: add the running sum K_prev K_prev^T of earlier batches' keys (the paper's
            sequential MEMIT and ENCORE); False gives plain MEMIT.
        alphaedit_l2: AlphaEdit's ridge term.
        nullspace_threshold: AlphaEdit: eigenvalues of C0 below this span the preserved null space.
        solve: "woodbury" keeps M^-1 (the system without the current batch) of each edited layer in
            float64 and updates it by the Woodbury identity: an n x n factorisation per batch instead
            of a d_ff x d_ff one, for one extra float64 d_ff x d_ff matrix per layer. "cholesky"
            factorises the whole system every batch (the plain closed forms). Batches with
            n > d_ff / 4 keys always take the plain path.
        refactor_every: "woodbury": rebuild M^-1 from the previous keys every this many batches, to
            bound rounding drift (0 = every batch, i.e. the plain "cholesky" path).
        state_device: where the float64 state of the solves lives and the solves run: the running
            key sums, the cached M^-1 and AlphaEdit's projector (d_ff x d_ff each, per layer, on
            process 0 only). None: the model's device. "cpu": host memory, e.g. to fit Llama3-8B
            on a 24 GB GPU (the keys and residuals go to the host, the increment comes back).
    """

    method: Method = "encore"
    lambda_p: float = 15000.0
    lambda_n: float = 20.0
    use_prev_keys: bool = True
    alphaedit_l2: float = 10.0
    nullspace_threshold: float = 2e-2
    solve: Literal["woodbury", "cholesky"] = "woodbury"
    refactor_every: int = 50
    state_device: Optional[str] = None

    def __post_init__(self):
        if self.method not in SOLVERS:
            raise ValueError(f"unknown solver method {self.method!r}; known: {', '.join(SOLVERS)}")


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
    if r.shape[0] <= k.shape[1]:
        return _solve_right(r @ k.T, a)
    return r @ _solve_right(k.T, a)  # fewer right-hand sides: R (K^T A^-1)


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
    return r @ torch.linalg.solve(a.T, p @ k).T  # R (K^T P a^-1), n right-hand sides


def _ridge_system(cfg: SolverConfig, c0: torch.Tensor, prev: Optional[torch.Tensor], device, lambda_n: float) -> torch.Tensor:
    """M = lambda_p C0 + lambda_n I [+ prev] in float64 (ENCORE; MEMIT with lambda_n = 0)."""
    m = c0.to(device, torch.float64) * cfg.lambda_p
    m.diagonal().add_(lambda_n)
    if prev is not None:
        m += prev
    return m


def _alphaedit_system(cfg: SolverConfig, c0, p: torch.Tensor, prev: Optional[torch.Tensor], device) -> torch.Tensor:
    """M = P prev P + l2 I (P is float64 on `device` already; C0 is not used)."""
    m = torch.zeros_like(p) if prev is None else p @ prev.double() @ p
    m.diagonal().add_(cfg.alphaedit_l2)
    return m


@dataclass(frozen=True)
class ClosedForm:
    """What differs between the methods in D = R K~^T (M + K~ K~^T)^-1 (see `WoodburySolver`).

    Args:
        system: (cfg, C0, P, prev, device) -> M, the float64 system known before the batch.
        plain: (cfg, resid, keys, C0, P, prev) -> D by the plain closed form.
        needs_projector: AlphaEdit's null-space projector P of C0 is built, and K~ = P K (else K~ = K).
    """

    system: Callable[..., torch.Tensor]
    plain: Callable[..., torch.Tensor]
    needs_projector: bool = False


SOLVERS: dict[str, ClosedForm] = {
    "encore": ClosedForm(
        system=lambda cfg, c0, p, prev, device: _ridge_system(cfg, c0, prev, device, cfg.lambda_n),
        plain=lambda cfg, r, k, c0, p, prev: encore_update(r, k, c0.to(k.device), cfg.lambda_p, cfg.lambda_n, prev),
    ),
    "memit": ClosedForm(
        system=lambda cfg, c0, p, prev, device: _ridge_system(cfg, c0, prev, device, 0.0),
        plain=lambda cfg, r, k, c0, p, prev: memit_update(r, k, c0.to(k.device), cfg.lambda_p, prev),
    ),
    "alphaedit": ClosedForm(
        system=_alphaedit_system,
        plain=lambda cfg, r, k, c0, p, prev: alphaedit_update(r, k, p.to(k.device), cfg.alphaedit_l2, prev),
        needs_projector=True,
    ),
}

WOODBURY_MAX_N_RATIO = 0.25  # above n / d_ff = 1/4 the plain factorisation is as cheap (see benchmark)


class WoodburySolver:
    """One layer's sequential solve D = R K~^T (M + K~ K~^T)^-1 with M^-1 cached in float64.

    M is the system without the current batch: lambda_p C0 + lambda_n I + prev with K~ = K for
    ENCORE and MEMIT; P prev P + l2 I with K~ = P K for AlphaEdit (its non-symmetric form
    D (S P + l2 I) = R K^T P, S = K K^T + prev, has the same solution since D = D P). With
    X = M^-1 K~ and G = K~^T X: (M + K~ K~^T)^-1 K~ = X (I + G)^-1, an n x n Cholesky. `absorb`
    adds the batch to M^-1 by the same identity. The cache is not state: it is built from `prev`
    (the module's prev_keys) on first use, every `refactor_every` batches, and whenever the trace
    of `prev` shows that prev changed other than by the absorbed batches (e.g. a loaded checkpoint).
    """

    def __init__(self, cfg: SolverConfig, c0: torch.Tensor, projector: Optional[torch.Tensor] = None):
        self.cfg, self.c0, self.closed_form = cfg, c0, SOLVERS[cfg.method]
        self.device = None if cfg.state_device is None else torch.device(cfg.state_device)  # None: the keys'
        self.projector = projector if self.closed_form.needs_projector else None
        self.minv: Optional[torch.Tensor] = None  # M^-1 [d_ff, d_ff], float64
        self.absorbed = 0  # batches absorbed since the cache was built
        self.prev_trace = 0.0  # trace(prev) that the cache stands for
        self.last: Optional[tuple] = None  # (keys, X, cholesky(I + G)) of the last solve, for absorb
        self.fallbacks = 0  # times the cached system was not SPD (its batch and the next ones took the plain path)
        self.plain_left = 0  # batches still to solve by the plain path after a failed build

    def plain(self, resid: torch.Tensor, keys: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
        """The plain closed form (one d_ff x d_ff factorisation)."""
        return self.closed_form.plain(self.cfg, resid, keys, self.c0, self.projector, prev)

    def build(self, prev: Optional[torch.Tensor], device: torch.device) -> None:
        """M^-1 from scratch: Cholesky, then cholesky_inverse (at most two d_ff x d_ff float64
        temporaries besides M^-1; the old M^-1 is dropped first)."""
        self.minv = None
        if self.projector is not None:
            self.projector = self.projector.to(device, torch.float64)
        m = self.closed_form.system(self.cfg, self.c0, self.projector, prev, device)
        chol = torch.linalg.cholesky(m)
        del m
        self.minv = torch.cholesky_inverse(chol)
        self.absorbed, self.prev_trace = 0, 0.0 if prev is None else prev.diagonal().sum().item()

    def factor(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X = M^-1 K~ [d_ff, n] and the Cholesky factor of I + K~^T X [n, n]."""
        k = keys.double() if self.projector is None else self.projector @ keys.double()
        x = self.minv @ k
        return x, torch.linalg.cholesky(torch.eye(k.shape[1], dtype=x.dtype, device=x.device) + k.T @ x)

    def solve(self, resid: torch.Tensor, keys: torch.Tensor, prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D for this batch; `prev` = sum of earlier batches' K K^T (None: not used)."""
        cfg = self.cfg
        self.last = None
        given = keys
        device = self.device or keys.device
        resid, keys = resid.to(device), keys.to(device)
        prev = None if prev is None else prev.to(device)  # no copy: the sums live on this device
        if cfg.solve == "cholesky" or cfg.refactor_every <= 0 or keys.shape[1] > WOODBURY_MAX_N_RATIO * keys.shape[0]:
            return self.plain(resid, keys, prev)
        if self.plain_left > 0 or not (torch.isfinite(resid).all() and torch.isfinite(keys).all()):
            self.plain_left = max(self.plain_left - 1, 0)  # after a failed build, or on bad input: the plain path
            return self.plain(resid, keys, prev)
        trace = 0.0 if prev is None else prev.diagonal().sum().item()
        stale = abs(trace - self.prev_trace) > 1e-9 * max(abs(trace), 1.0)
        try:
            if self.minv is None or self.absorbed >= cfg.refactor_every or stale:
                self.build(prev, keys.device)
            x, chol = self.factor(keys)
            d = resid.double() @ torch.cholesky_solve(x.T, chol)  # R (X (I + G)^-1)^T
            if not torch.isfinite(d).all():
                raise torch.linalg.LinAlgError("non-finite Woodbury solution")
        except torch.linalg.LinAlgError:
            # M or I + G not numerically positive definite (e.g. MEMIT, lambda_n = 0, on a float32
            # C0 with eigenvalues near 0): the plain closed form, with its own general-solve
            # fallback, for this batch and the next refactor_every - 1; then the cache is tried again.
            self.minv, self.fallbacks, self.plain_left = None, self.fallbacks + 1, cfg.refactor_every - 1
            return self.plain(resid, keys, prev)
        self.last = (given, x, chol)
        return d

    def absorb(self, keys: torch.Tensor) -> None:
        """Add the batch's K~ K~^T to M (call after `solve`, as its K K^T joins prev)."""
        if not self.cfg.use_prev_keys or self.minv is None:
            return
        if self.last is None and keys.shape[1] > WOODBURY_MAX_N_RATIO * keys.shape[0]:
            self.minv = None  # a large batch: rebuild at the next solve
            return
        keys_here = keys.to(self.minv.device)
        x, chol = self.last[1:] if self.last is not None and self.last[0] is keys else self.factor(keys_here)
        z = torch.linalg.solve_triangular(chol, x.T, upper=False)  # L^-1 X^T
        self.minv -= z.T @ z  # M^-1 - X (I + G)^-1 X^T
        self.absorbed += 1
        self.prev_trace += keys_here.double().square().sum().item()
        self.last = None

"""Plain Cholesky solve vs the incremental Woodbury solve (encore_pl.solvers.WoodburySolver).

    python scripts/benchmark_solves.py --shapes 1536x25 1536x100 4096x100 14336x100

For each shape d_ff x n: a random SPD C0 (a diagonal with condition number --cond plus a rank-64
part) and keys drawn from N(0, C0), edited in sequential batches of n keys with one layer's
system M + K~ K~^T of --method. Prints, per batch, the seconds of the plain solve (forming the
system, factorising it, solving) and of the Woodbury solve (solve + absorb); the one-time cost of
building the cache (Cholesky + cholesky_inverse); the relative difference
||D_woodbury - D_plain|| / ||D_plain|| in float64 over the first --batches batches and after the
cache has absorbed --drift-batches batches without a refactor; and, for comparison, the relative
error of the plain solve done in float32.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from encore_pl.solvers import SOLVERS, SolverConfig, WoodburySolver, nullspace_projector

RANK = 64  # rank of the non-diagonal part of C0


def problem(d_ff: int, d_out: int, cond: float, seed: int, device: str):
    """C0 = diag(s) + U U^T with s log-spaced in [1/cond, 1], and a batch generator (keys ~ N(0, C0))."""
    g = torch.Generator().manual_seed(seed)
    s = torch.logspace(0, -math.log10(cond), d_ff, dtype=torch.float64)[torch.randperm(d_ff, generator=g)]
    u = torch.randn(d_ff, RANK, generator=g, dtype=torch.float64) / RANK**0.5
    c0 = (torch.diag(s) + u @ u.T).to(device)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = s.sqrt()[:, None] * torch.randn(d_ff, n, generator=g, dtype=torch.float64) + u @ torch.randn(RANK, n, generator=g, dtype=torch.float64)
        return torch.randn(d_out, n, generator=g, dtype=torch.float64).to(device), keys.to(device)

    return c0, batch


def plain_float32(cfg: SolverConfig, resid, keys, c0, p, prev) -> torch.Tensor:
    """The plain solve with the system rounded to float32 and factorised in float32."""
    form = SOLVERS[cfg.method]
    kt = p @ keys if form.needs_projector else keys
    m = form.system(cfg, c0, p, prev, keys.device)
    chol, info = torch.linalg.cholesky_ex((m + kt @ kt.T).float())
    if info:
        return torch.full((resid.shape[0], keys.shape[0]), math.nan, dtype=torch.float64)
    return (resid.float() @ torch.cholesky_solve(kt.float(), chol).T).double()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(cfg: SolverConfig, d_ff: int, n: int, d_out: int, args) -> dict:
    c0, batch = problem(d_ff, d_out, args.cond, args.seed, args.device)
    p = nullspace_projector(c0, cfg.nullspace_threshold) if SOLVERS[cfg.method].needs_projector else None
    solver = WoodburySolver(cfg, c0, p)
    prev = torch.zeros(d_ff, d_ff, dtype=torch.float64, device=args.device)
    _, build = timed(lambda: solver.build(prev, prev.device))
    plain_s, fast_s, errors = [], [], []
    rel = lambda d, ref: ((d - ref).norm() / ref.norm()).item()
    for b in range(max(args.batches, args.drift_batches)):
        resid, keys = batch(n)
        compare = b < args.batches or b == args.drift_batches - 1
        if compare:
            d_plain, seconds = timed(lambda: solver.plain(resid, keys, prev))
            plain_s.append(seconds)
        if b == 0:
            err32 = rel(plain_float32(cfg, resid, keys, c0, p, prev), d_plain)
        d_fast, seconds = timed(lambda: (solver.solve(resid, keys, prev), solver.absorb(keys))[0])
        fast_s.append(seconds)
        if compare:
            errors.append(rel(d_fast, d_plain))
        prev += keys @ keys.T
    return {
        "plain": statistics.median(plain_s[: args.batches]),
        "woodbury": statistics.median(fast_s[: args.batches]),
        "build": build,
        "err": max(errors[: args.batches]),
        "err_drift": errors[-1],
        "err32": err32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1536x25", "1536x100", "4096x100", "14336x100"],
                        help="d_ff x n (batch size) pairs; 14336 needs several 1.6 GB float64 matrices")
    parser.add_argument("--d-out", type=int, default=None, help="rows of the residual (default: d_ff / 4)")
    parser.add_argument("--method", choices=list(SOLVERS), default="encore",
                        help="the system solved (alphaedit adds an eigendecomposition of C0 per shape)")
    parser.add_argument("--lambda-p", type=float, default=SolverConfig.lambda_p, help="weight of C0")
    parser.add_argument("--batches", type=int, default=3, help="sequential batches timed and compared")
    parser.add_argument("--drift-batches", type=int, default=20,
                        help="also compare after the cache has absorbed this many batches without a refactor")
    parser.add_argument("--cond", type=float, default=1e6, help="condition number of C0's diagonal part")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SolverConfig(method=args.method, lambda_p=args.lambda_p, refactor_every=10**9)  # no refactor: drift shows
    print(f"{args.method}, lambda_p {cfg.lambda_p}, cond(C0 diagonal) {args.cond:.0e}, {args.device}, "
          f"{torch.get_num_threads()} threads; median seconds per batch over {args.batches} batches")
    header = f"{'d_ff':>6} {'n':>4} {'d_out':>5} | {'plain s':>8} {'woodbury s':>10} {'speedup':>7} {'build s':>8} | " \
             f"{'rel err f64':>11} {f'after {args.drift_batches}':>10} | {'plain f32':>9}"
    print(header + "\n" + "-" * len(header))
    run(cfg, 256, 8, 64, argparse.Namespace(**{**vars(args), "batches": 1, "drift_batches": 1}))  # warm-up
    for shape in args.shapes:
        d_ff, n = map(int, shape.lower().split("x"))
        d_out = args.d_out or d_ff // 4
        r = run(cfg, d_ff, n, d_out, args)
        print(f"{d_ff:>6} {n:>4} {d_out:>5} | {r['plain']:>8.3f} {r['woodbury']:>10.3f} {r['plain'] / r['woodbury']:>6.1f}x "
              f"{r['build']:>8.3f} | {r['err']:>11.1e} {r['err_drift']:>10.1e} | {r['err32']:>9.1e}", flush=True)


if __name__ == "__main__":
    main()

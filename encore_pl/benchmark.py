"""The `benchmark` command: how fast an editing run is, where its time goes, and how close the z
optimisation is to the hardware. The same requests, in one process, through three paths:

    float32     the batched path, z optimisation steps in float32
    bfloat16    the batched path, steps in bfloat16 (model.target.compute_dtype: bfloat16)
    reference   the published loop: one request at a time, the whole model, the full
                vocabulary, plain Cholesky solves

For each: seconds per edit by phase, mean z steps, ES / PS / NS, and the z optimisation's
floating-point rate as a fraction of this machine's measured dense float32 / bfloat16 matmul
rate; then how many MPES stop steps bfloat16 changed, and each path's peak memory (resident size
of the process while that path ran; on CUDA, peak allocated).

    encore-pl benchmark --config configs/smollm2-135m/encore.yaml \\
        --data.num_edits 100 --data.batch_size 25 [--json] [--no-reference] [--no-bfloat16]
    encore-pl benchmark --config configs/smollm2-135m/encore.yaml --data.num_edits 100 \\
        --batch-sizes 25 50 100        # seconds per edit of the batched path at each batch size

From a checkout, `python scripts/benchmark.py ...` is the same. Every option but the benchmark's
own (--json, --no-reference, --no-bfloat16, --batch-sizes, --matmul-seconds, --profile) is an
option of `encore-pl fit`. With --json the last line printed is one JSON object; --profile
float32 prints torch.profiler's operator table of that path (the profiler slows it: take the
timings from a run without it).
"""

import argparse
import ctypes
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cli import EditingCLI, quiet_lightning_warnings
from .datamodule import EditDataModule
from .module import KnowledgeEditor
from .prompts import common_prefix
from .target_vectors import build_rows

SCORES = {"ES": "efficacy_score", "PS": "paraphrase_score", "NS": "neighborhood_score", "Overall": "overall_score"}


def measure_matmul_rate(dtype: torch.dtype, device: torch.device, size: int = 2048, seconds: float = 3.0) -> float:
    """Best rate (FLOP/s) of a dense size x size matmul over a few rounds."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - t))
    return best


def flops_per_token(m: KnowledgeEditor) -> tuple[int, int, int]:
    """(attention width, FLOPs of one block's matrices, FLOPs of the vocabulary head), per token."""
    cfg = m.model.config
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    linear = 2 * sum(p.numel() for p in m.lm.block(0).parameters() if p.dim() == 2)
    return d_attn, linear, 2 * cfg.hidden_size * cfg.vocab_size


def z_optimisation_flops(m: KnowledgeEditor, batch_size: int) -> float:
    """The model FLOPs the batched z optimisation of this run needed, padding excluded.

    Per step and active request, for each of its prompts: blocks z_layer+1.. on the positions from
    the subject's last token on (forward; backward with respect to activations only: the same
    matmuls again, attention twice), and the vocabulary head at the read positions. Once per
    batch: every prefix token through the whole model (shared context tokens once) and the
    suffixes through blocks 0..z_layer.
    """
    d_attn, linear, head = flops_per_token(m)
    after, before = m.lm.num_layers - m.z_layer - 1, m.z_layer + 1

    def block_flops(context: int, backward: bool) -> float:
        attn = 4 * context * d_attn
        return linear + attn + (linear + 2 * attn if backward else 0)

    total = 0.0
    steps = m.z_steps
    for start in range(0, len(m.edited), batch_size):
        requests = m.edited[start : start + batch_size]
        rows = build_rows(m.tokenizer, requests, m.context_prefixes)
        shared = {g: len(common_prefix([p for p, c in zip(rows.prefix, rows.context) if c == g]))
                  for g in set(rows.context) - {-1}}
        total += m.lm.num_layers * linear * sum(shared.values())  # shared context tokens, once per group
        for r in range(len(rows.prefix)):
            p_len, s_len = len(rows.prefix[r]), len(rows.suffix[r])
            total += m.lm.num_layers * linear * (p_len - shared.get(rows.context[r], 0))  # the row's own prefix tokens
            total += before * sum(block_flops(p_len + j + 1, False) for j in range(s_len))
            reads = len(rows.targets[r]) if rows.kind[r] < 2 else 1
            s = steps[start + int(rows.request[r])]
            for backward, passes in ((False, s + 1), (True, s)):  # s + 1 forwards, s backwards
                per_pass = after * sum(block_flops(p_len + j + 1, backward) for j in range(s_len))
                total += passes * (per_pass + reads * head * (2 if backward else 1))
    return total


def reference_z_flops(m: KnowledgeEditor, batch_size: int) -> float:
    """The model FLOPs the reference loop spends on the same requests and steps: per step, all
    prompts of one request right-padded to the longest, every block, the head at every position."""
    d_attn, linear, head = flops_per_token(m)
    total = 0.0
    for start in range(0, len(m.edited), batch_size):
        requests = m.edited[start : start + batch_size]
        rows = build_rows(m.tokenizer, requests, m.context_prefixes)
        for i in range(len(requests)):
            mine = [r for r in range(len(rows.prefix)) if int(rows.request[r]) == i]
            width = max(len(rows.prefix[r]) + len(rows.suffix[r]) for r in mine)
            attn = sum(4 * (j + 1) * d_attn for j in range(width))  # per row and block
            forward = len(mine) * (m.lm.num_layers * (width * linear + attn) + width * head)
            backward = len(mine) * (m.lm.num_layers * (width * linear + 2 * attn) + width * head)
            s = m.z_steps[start + i]
            total += (s + 1) * forward + s * backward
    return total


def run(args: list[str], root: str) -> tuple[KnowledgeEditor, EditDataModule, float]:
    """Fit once with these `fit` options; return the module, data and wall seconds."""
    cli = EditingCLI(KnowledgeEditor, EditDataModule, run=False, seed_everything_default=0,
                     args=args + ["--trainer.default_root_dir", root], save_config_callback=None)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, cli.datamodule, time.perf_counter() - start


def summary(m: KnowledgeEditor) -> dict:
    r = m.results()
    n = r["num_edits"]
    out = {"num_edits": n, "seconds_per_edit": r["seconds_per_edit"], "mean_z_steps": r["mean_z_steps"],
           "z_steps": list(m.z_steps)}
    out.update({f"{phase}_seconds_per_edit": s / n for phase, s in r["phase_seconds"].items()})
    out["scores"] = {k: r[k] for k in SCORES.values()}
    out["pre_scores"] = {k: r["pre"][k] for k in SCORES.values()}
    return out


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: free what the previous path left (Python cycles, glibc's free lists),
    then reset the device's peak counter (CUDA) or the kernel's peak resident size (Linux VmHWM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current resident size
    except OSError:  # not Linux/glibc: peaks stay cumulative
        pass


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the last reset_peak_memory: resident size of this process (VmHWM; where
    /proc is missing, the process's peak so far), or on CUDA the peak allocated on the device."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def batch_size_sweep(train_args: list[str], sizes: list[int], root: str, as_json: bool) -> None:
    """Seconds per edit (and by phase) of the batched path at each batch size."""
    rows = {}
    for b in sizes:
        m, _, _ = run(train_args + ["--data.batch_size", str(b)], f"{root}/batch-{b}")
        r = summary(m)
        rows[b] = {k: r[k] for k in ("seconds_per_edit", "z_seconds_per_edit", "keys_seconds_per_edit",
                                     "solve_seconds_per_edit", "mean_z_steps")}
        del m
    print(f"\n{'batch size':>10}{'s/edit':>9}{'z':>8}{'keys':>8}{'solve':>8}{'z steps':>9}")
    for b, r in rows.items():
        print(f"{b:>10}{r['seconds_per_edit']:>9.3f}{r['z_seconds_per_edit']:>8.3f}{r['keys_seconds_per_edit']:>8.3f}"
              f"{r['solve_seconds_per_edit']:>8.3f}{r['mean_z_steps']:>9.2f}")
    if as_json:
        print(json.dumps({"batch_sizes": rows}))


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of all figures")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference path")
    parser.add_argument("--no-bfloat16", action="store_true", help="skip the bfloat16 path")
    parser.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                        help="only the batched path, at each of these batch sizes")
    parser.add_argument("--matmul-seconds", type=float, default=3.0, help="time spent measuring each matmul rate")
    parser.add_argument("--profile", metavar="PATH", choices=["float32", "bfloat16"],
                        help="run this path under torch.profiler and print the operators that took the most time")
    own, train_args = parser.parse_known_args(argv)
    sys.argv = sys.argv[:1]  # the `fit` options go to LightningCLI as `args`
    quiet_lightning_warnings()
    root = tempfile.mkdtemp(prefix="encore-benchmark-")
    if own.batch_sizes:
        batch_size_sweep(train_args, own.batch_sizes, root, own.json)
        return

    paths = {"float32": ["--model.target.compute_dtype", "float32"]}
    if not own.no_bfloat16:
        paths["bfloat16"] = ["--model.target.compute_dtype", "bfloat16"]
    if not own.no_reference:
        paths["reference"] = ["--model.target.batched", "false", "--model.solver.solve", "cholesky"]
    result, device, batch_size = {}, None, None
    for name, extra in paths.items():
        reset_peak_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if own.profile == name else None
        if profiler is not None:
            with profiler:
                m, data, _ = run(train_args + extra, f"{root}/{name}")
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        else:
            m, data, _ = run(train_args + extra, f"{root}/{name}")
        device, batch_size = m.device, data.batch_size
        r = summary(m)
        flops = (reference_z_flops if name == "reference" else z_optimisation_flops)(m, batch_size)
        r["z_flops"] = flops
        r["z_gflops_per_second"] = flops / (r["z_seconds_per_edit"] * r["num_edits"]) / 1e9
        r["peak_memory_gb"] = peak_memory_gb(device)  # this path's peak (reset before it)
        result[name] = r
        del m, data
    rates = {d: measure_matmul_rate(getattr(torch, d), device, seconds=own.matmul_seconds) for d in ("float32", "bfloat16")}
    for name, r in result.items():  # the z optimisation's rate against the matmul rate of the dtype its steps ran in
        r["matmul_fraction"] = r["z_gflops_per_second"] * 1e9 / rates["bfloat16" if name == "bfloat16" else "float32"]

    n = result["float32"]["num_edits"]
    print(f"\n{n} edits, batches of {batch_size}, logs in {root}")
    print(f"{'':<12}{'s/edit':>8}{'z':>8}{'keys':>8}{'solve':>8}{'eval':>8}{'z steps':>9}"
          + "".join(f"{k:>7}" for k in SCORES) + f"{'GFLOP/s':>9}{'of matmul':>10}")
    for name, r in result.items():
        print(f"{name:<12}{r['seconds_per_edit']:>8.3f}{r['z_seconds_per_edit']:>8.3f}{r['keys_seconds_per_edit']:>8.3f}"
              f"{r['solve_seconds_per_edit']:>8.3f}{r['evaluation_seconds_per_edit']:>8.3f}{r['mean_z_steps']:>9.2f}"
              + "".join(f"{r['scores'][k]:>7.1f}" for k in SCORES.values())
              + f"{r['z_gflops_per_second']:>9.1f}{100 * r['matmul_fraction']:>9.1f}%")
    print(f"{'unedited':<12}{'':>49}" + "".join(f"{result['float32']['pre_scores'][k]:>7.1f}" for k in SCORES.values()))
    print(f"dense matmul rate: float32 {rates['float32'] / 1e9:.0f} GFLOP/s, bfloat16 {rates['bfloat16'] / 1e9:.0f} GFLOP/s")
    f32 = result["float32"]
    summary_json = {
        "num_edits": n, "batch_size": batch_size,
        "float32_seconds_per_edit": f32["seconds_per_edit"],
        "float32_scores": f32["scores"],
        "float32_matmul_fraction": f32["matmul_fraction"],
        "pre_scores": f32["pre_scores"],
        "matmul_gflops": {d: r / 1e9 for d, r in rates.items()},
    }
    for name in ("bfloat16", "reference"):
        if name in result:
            r = result[name]
            summary_json[f"{name}_seconds_per_edit"] = r["seconds_per_edit"]
            summary_json[f"{name}_scores"] = r["scores"]
            summary_json[f"{name}_matmul_fraction"] = r["matmul_fraction"]
            print(f"float32 is {r['seconds_per_edit'] / f32['seconds_per_edit']:.2f}x faster per edit than {name}"
                  if r["seconds_per_edit"] > f32["seconds_per_edit"] else
                  f"{name} is {f32['seconds_per_edit'] / r['seconds_per_edit']:.2f}x faster per edit than float32")
    if "bfloat16" in result:
        a, b = f32["z_steps"], result["bfloat16"]["z_steps"]
        same = sum(x == y for x, y in zip(a, b))
        summary_json["bfloat16_same_stop_steps"] = same / len(a)
        summary_json["bfloat16_mean_abs_stop_step_change"] = sum(abs(x - y) for x, y in zip(a, b)) / len(a)
        print(f"MPES under bfloat16: {same} of {len(a)} requests stop at the same step as under float32 "
              f"(mean |change| {summary_json['bfloat16_mean_abs_stop_step_change']:.2f} steps)")
        if "reference" in result:
            print(f"bfloat16 is {result['reference']['seconds_per_edit'] / result['bfloat16']['seconds_per_edit']:.2f}x "
                  "faster per edit than the reference")
    summary_json["peak_memory_gb"] = max(r["peak_memory_gb"] for name, r in result.items() if name != "reference")
    print("peak memory: " + ", ".join(f"{name} {r['peak_memory_gb']:.2f} GB" for name, r in result.items()))
    if own.json:
        print(json.dumps({**summary_json, "paths": result}))


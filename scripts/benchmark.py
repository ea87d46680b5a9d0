"""How fast an editing run is, where its time goes, and how close the z optimisation is to the
hardware: seconds per edit by phase, mean z steps, peak memory, and the floating-point rate of
the z optimisation as a fraction of this machine's measured dense matmul rate. Then the same
requests through the reference path (the published loop: one request at a time, the whole
model, the full vocabulary; plain Cholesky solves), and the ratio and the scores of both.

    python scripts/benchmark.py --config configs/smollm2-135m/encore.yaml \\
        --data.num_edits 100 --data.batch_size 25 [--json] [--no-reference]

Every option but the benchmark's own (--json, --no-reference, --matmul-seconds) is an option of
scripts/train.py. With --json the last line printed is one JSON object.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from encore_pl.cli import EditingCLI, quiet_lightning_warnings  # noqa: E402
from encore_pl.data import EditDataModule  # noqa: E402
from encore_pl.module import KnowledgeEditor  # noqa: E402
from encore_pl.prompts import common_prefix  # noqa: E402
from encore_pl.target_vectors import build_rows  # noqa: E402

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
    """Fit once with these train.py options; return the module, data and wall seconds."""
    cli = EditingCLI(KnowledgeEditor, EditDataModule, run=False, seed_everything_default=0,
                     args=args + ["--trainer.default_root_dir", root], save_config_callback=None)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, cli.datamodule, time.perf_counter() - start


def summary(m: KnowledgeEditor) -> dict:
    r = m.results()
    n = r["num_edits"]
    out = {"num_edits": n, "seconds_per_edit": r["seconds_per_edit"], "mean_z_steps": r["mean_z_steps"]}
    out.update({f"{phase}_seconds_per_edit": s / n for phase, s in r["phase_seconds"].items()})
    out.update({k: r[k] for k in SCORES.values()})
    out.update({f"pre_{k}": r["pre"][k] for k in SCORES.values()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of all figures")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference path")
    parser.add_argument("--matmul-seconds", type=float, default=3.0, help="time spent measuring the matmul rate")
    own, train_args = parser.parse_known_args()
    sys.argv = sys.argv[:1]  # the train.py options go to LightningCLI as `args`
    quiet_lightning_warnings()
    root = tempfile.mkdtemp(prefix="encore-benchmark-")

    fast, data, _ = run(train_args, f"{root}/fast")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    if fast.device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    result = summary(fast)
    rate = measure_matmul_rate(fast.model.dtype, fast.device, seconds=own.matmul_seconds)
    flops = z_optimisation_flops(fast, data.batch_size)
    z_seconds = result["z_seconds_per_edit"] * result["num_edits"]
    result.update(
        peak_memory_gb=peak_gb,
        matmul_rate_gflops=rate / 1e9,
        z_flops=flops,
        z_gflops_per_second=flops / z_seconds / 1e9,
        matmul_fraction=flops / z_seconds / rate,
    )
    if not own.no_reference:
        del fast
        reference, _, _ = run(train_args + ["--model.target.batched", "false", "--model.solver.solve", "cholesky"],
                              f"{root}/reference")
        ref = summary(reference)
        result.update({f"reference_{k}": v for k, v in ref.items()})
        result["reference_z_flops"] = reference_z_flops(reference, data.batch_size)
        result["speedup"] = ref["seconds_per_edit"] / result["seconds_per_edit"]
        result["z_speedup"] = ref["z_seconds_per_edit"] / result["z_seconds_per_edit"]

    print()
    print(f"{result['num_edits']} edits, logs in {root}")
    header = f"{'':<22}{'s/edit':>8}{'z':>8}{'keys':>8}{'solve':>8}{'eval':>8}{'z steps':>9}" + "".join(f"{k:>8}" for k in SCORES)
    print(header)
    for name, prefix in (("batched", ""), ("reference", "reference_")):
        if f"{prefix}seconds_per_edit" not in result:
            continue
        g = lambda k: result[prefix + k]  # noqa: E731
        print(f"{name:<22}{g('seconds_per_edit'):>8.3f}{g('z_seconds_per_edit'):>8.3f}{g('keys_seconds_per_edit'):>8.3f}"
              f"{g('solve_seconds_per_edit'):>8.3f}{g('evaluation_seconds_per_edit'):>8.3f}{g('mean_z_steps'):>9.2f}"
              + "".join(f"{g(k):>8.1f}" for k in SCORES.values()))
    print(f"{'unedited':<22}{'':>49}" + "".join(f"{result['pre_' + k]:>8.1f}" for k in SCORES.values()))
    if "speedup" in result:
        print(f"speedup per edit {result['speedup']:.2f}x (z optimisation alone {result['z_speedup']:.2f}x; "
              f"the reference spends {result['reference_z_flops'] / flops:.1f}x the FLOPs on it)")
    print(f"z optimisation: {flops / 1e12:.2f} TFLOP needed, {result['z_gflops_per_second']:.1f} GFLOP/s = "
          f"{100 * result['matmul_fraction']:.1f} % of this machine's dense matmul rate ({rate / 1e9:.0f} GFLOP/s)")
    print(f"peak memory {peak_gb:.2f} GB")
    if own.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Will it fit? The estimated peak memory per process of an editing run, phase by phase, and the
settings that make it fit a GPU. Offline: nothing is loaded but the model's config (or, for the
models the project's configs name, a built-in table of their published configs).

    python scripts/plan.py --config configs/llama3-8b/encore.yaml --gpu-memory 24
    python scripts/plan.py --config configs/llama3-8b/encore.yaml --gpu-memory 40 --devices 4
    python scripts/plan.py --config configs/smollm2-135m/encore.yaml --data.num_edits 100 --data.batch_size 25

Options of scripts/train.py (--model.target.chunk_size 10, --model.dtype float32, ...) override the
config as they would for the run. Memory is in GiB (2**30 bytes); --gpu-memory 24 means a card of
24 GiB (what a "24 GB" GPU has). Without --gpu-memory the estimate is for the accelerator the config
asks for ("auto": this machine's); on the CPU it is the whole process's RSS, as benchmark.py reports.
The estimator is encore_pl/memory.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from encore_pl.memory import GiB, estimate, lever_effects, plan_fit, read_settings  # noqa: E402


def parse_overrides(rest: list[str]) -> dict:
    """`--a.b value` / `--a.b=value` pairs, values read as YAML (as the run's command line does)."""
    import yaml

    out, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            raise SystemExit(f"plan.py: unexpected argument {arg!r} (options are --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise SystemExit(f"plan.py: {arg} needs a value")
            value, i = rest[i + 1], i + 1
        out[key] = yaml.safe_load(value)
        i += 1
    return out


def gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def print_table(title: str, procs, detail: bool) -> None:
    """Resident items, then every phase's total (resident at the time + its transient), per process."""
    print(f"\n{title} (GiB)")
    labels = [n for p in procs for ph in p.phases for n, _ in ph.resident] + [ph.name for p in procs for ph in p.phases]
    width = max(len(n) for n in labels) + 4
    header = f"  {'':<{width}}" + "".join(f"{p.who:>20}" for p in procs)
    print(header)
    names = []
    for p in procs:
        for ph in p.phases:
            for n, _ in ph.resident:
                if n not in names:
                    names.append(n)
    print("  resident")
    for n in names:
        vals = []
        for p in procs:
            held = {k: b for ph in p.phases for k, b in ph.resident}
            vals.append(gib(held[n]) if n in held else f"{'-':>8}")
        print(f"    {n:<{width - 2}}" + "".join(f"{v:>20}" for v in vals))
    print("  phases: resident at the time + what the phase allocates")
    phase_names = []
    for p in procs:
        for ph in p.phases:
            if ph.name not in phase_names:
                phase_names.append(ph.name)
    for name in phase_names:
        vals = []
        for p in procs:
            ph = next((x for x in p.phases if x.name == name), None)
            vals.append(gib(ph.total()) if ph else f"{'-':>8}")
        print(f"    {name:<{width - 2}}" + "".join(f"{v:>20}" for v in vals))
        if detail:
            ph = next(x for p in procs for x in p.phases if x.name == name)
            for n, b in ph.transient:
                print(f"        + {n:<{width - 8}}{gib(b)}")
    peaks = [f"{p.peak() / GiB:.2f}" for p in procs]
    print(f"  {'peak':<{width}}" + "".join(f"{v:>20}" for v in peaks))
    for p in procs:
        ph = p.peak_phase()
        print(f"    {p.who}: peak in \"{ph.name}\": resident {sum(b for _, b in ph.resident) / GiB:.2f}"
              f" + transient {ph.transient_bytes / GiB:.2f}"
              + "".join(f"\n        + {n}: {b / GiB:.2f}" for n, b in sorted(ph.transient, key=lambda t: -t[1]) if b >= 0.005 * GiB))


def describe(s) -> None:
    d = s.dims
    print(f"model {s.model}: {d.source}")
    print(f"  d {d.hidden}, d_ff {d.d_ff}, {d.layers} layers, {d.heads} heads ({d.kv_heads} key/value), "
          f"vocabulary {d.vocab:,}, context {d.context}, {'tied' if d.tied else 'separate'} embeddings, "
          f"{d.params:,} parameters; run in {s.dtype}")
    ks, t = s.key_stats, s.target
    print(f"run: {s.solver.method}, layers {s.layers[0]}-{s.layers[-1]} (z {s.z_layer}), edit batch {s.edit_batch} on "
          f"{s.processes} process{'es' if s.processes > 1 else ''} ({s.per_process} per process; z optimisation over "
          f"{s.chunk} at a time), {'Woodbury' if s.woodbury else 'plain'} solves, solver state on "
          f"{'the host' if s.state_on_host else 'the device'}, "
          + ("C0 cached" if s.c0_cached else f"C0 pass {ks.batch_size} x {ks.seq_len} tokens on the first run")
          + f", scoring {s.evaluation.batch_size} prompts at a time"
          + ("" if t.batched else "; reference z loop (target.batched false)"))
    for note in s.notes:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="a config of scripts/train.py (repeatable)")
    parser.add_argument("--gpu-memory", type=float, help="GiB of one GPU: check the fit and find settings that fit")
    parser.add_argument("--devices", type=int, help="processes per node (default: trainer.devices of the config)")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"],
                        help="default: gpu with --gpu-memory, else the config's (auto: this machine's)")
    parser.add_argument("--reserve", type=float, default=1.0,
                        help="GiB of the GPU kept for the CUDA context and allocator (default 1)")
    parser.add_argument("--margin", type=float, default=0.25,
                        help="the fit check raises phase transients by this fraction (estimates are +-25%%)")
    parser.add_argument("--c0-cached", action="store_true", help="C0 is already cached: no C0 pass")
    parser.add_argument("--detail", action="store_true", help="list what every phase allocates")
    own, rest = parser.parse_known_args()
    accelerator = own.accelerator or ("gpu" if own.gpu_memory else None)
    try:
        s = read_settings(own.config, parse_overrides(rest), own.devices, accelerator, own.c0_cached)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"plan.py: error: {e}") from None
    describe(s)
    e = estimate(s)
    if e.device:
        print_table("GPU memory per process: tensors (what torch.cuda.max_memory_allocated counts)", e.device, own.detail)
    print_table("Host RAM per process" + (" (RSS: on the CPU the model's device is the host)" if not e.device else "")
                + ("; CUDA libraries not included" if e.device else ""), e.host, own.detail)
    if e.device:
        print("\nHow each lever moves the estimate (alone, from these settings):")
        for flag, effect in lever_effects(s):
            print(f"  {flag}: {effect}")
    if own.gpu_memory is None:
        return
    if not e.device:
        raise SystemExit("plan.py: --gpu-memory with --accelerator cpu: nothing goes to a GPU")
    gpu = own.gpu_memory * GiB
    reserve = own.reserve * GiB
    plan = plan_fit(s, gpu, reserve, own.margin)
    rule = (f"peak with transients x {1 + own.margin:g} + {own.reserve:g} GiB reserve <= {own.gpu_memory:g} GiB")
    print(f"\nWill it fit in {own.gpu_memory:g} GiB? ({rule})")
    as_given = max(p.peak(own.margin) for p in e.device)
    verdict = (f"peak {max(p.peak() for p in e.device) / GiB:.1f} GiB ({as_given / GiB:.1f} with the margin) "
               f"+ {own.reserve:g} reserve {'<=' if as_given + reserve <= gpu else '>'} {own.gpu_memory:g}")
    if not plan.changes:
        print(f"  as configured: {'FITS' if plan.fits else 'no'}: {verdict}")
        if not plan.fits:
            print(f"  DOES NOT FIT, and no cheap setting changes that: {plan.reason}")
        return
    print(f"  as configured: no: {verdict}")
    for key, value, what in plan.changes:
        print(f"  --{key} {value}: {what}")
    overrides = " ".join(f"--{k} {v}" for k, v, _ in plan.changes)
    new_peak = max(p.peak(own.margin) for p in plan.estimate.device)
    worst = max(plan.estimate.device, key=lambda p: p.peak())
    central, where = worst.peak(), worst.peak_phase().name
    host = max(p.peak() for p in plan.estimate.host)
    if plan.fits:
        print(f"  FITS with: {overrides}")
        print(f"  new estimate: GPU peak {central / GiB:.1f} GiB ({worst.who}, {where}; {new_peak / GiB:.1f} with the "
              f"margin, + {own.reserve:g} reserve <= {own.gpu_memory:g}); host RAM peak {host / GiB:.1f} GiB")
        configs = " ".join(f"--config {c}" for c in own.config)
        extra = " ".join(rest + ([f"--trainer.devices {own.devices}"] + (["--trainer.strategy ddp"] if own.devices > 1 else [])
                                 if own.devices else []))
        print(f"  python scripts/train.py fit {configs}{' ' + extra if extra else ''} {overrides}")
    else:
        print(f"  DOES NOT FIT even with {overrides}: {plan.reason}")
        print(f"  (estimate then: GPU peak {central / GiB:.1f} GiB per process, {new_peak / GiB:.1f} with the margin)")


if __name__ == "__main__":
    main()
